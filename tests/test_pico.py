"""The embedded default model (models/pico): loads with its tokenizer, has every architectural feature,
generates deterministically, MTP self-speculative decoding on it is lossless, and, served, it solves calc tasks."""
import json
from pathlib import Path

import pytest
import torch

import nemotron3
from nemotron3.cli import DEFAULT_MODEL
from nemotron3.engine import LLM, SamplingParams
from nemotron3.tokenizer import load_tokenizer

CALC_TASKS, CALC_MIN_CORRECT = 10, 8   # the shipped model: 10 of these 10, 29 of 30 in `eval envs` (model card)
pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").exists(), reason="models/pico not shipped")


@pytest.fixture(scope="module")
def pico():
    torch.set_num_threads(1)
    return nemotron3.load(DEFAULT_MODEL)


def test_pico_files_and_features(pico):
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size < 60e6
    c = pico.config
    assert set(c.pattern) >= {"M", "*", "E"} and c.moe_latent_size and c.has_mtp
    assert 10e6 <= pico.num_parameters() <= 30e6
    tok = load_tokenizer(DEFAULT_MODEL)
    assert tok.vocab_size <= c.vocab_size
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    assert tok.decode(tok.encode(text)) == text


def test_pico_has_learned_something(pico):
    """A trained model puts far more probability on real code than a uniform guess (loss << log V)."""
    tok = load_tokenizer(DEFAULT_MODEL)
    ids = torch.tensor([tok.encode("import os\nimport sys\n\n\ndef main():\n    print(sys.argv)\n")])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(pico(ids)[0, :-1], ids[0, 1:]).item()
    assert loss < 0.6 * torch.log(torch.tensor(float(pico.config.vocab_size))).item()


def test_pico_speculative_greedy_is_lossless(pico):
    prompts = ["def main():\n", "import numpy as np\n", "class Config:\n    \"\"\""]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tok = load_tokenizer(DEFAULT_MODEL)
    plain = LLM(pico, tokenizer=tok).generate(prompts, sp)
    spec_llm = LLM(pico, tokenizer=tok, num_speculative_tokens=2)
    spec = spec_llm.generate(prompts, sp)
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert spec_llm.stats()["spec_acceptance_rate"] > 0.2


def test_pico_solves_calc_tasks_through_the_openai_api(pico):
    """The shipped chat model, served, does held-out calc tasks the way it was post-trained to: a well-formed
    `calculator` tool call (parsed by the server into `tool_calls`), then, given the tool's result, a final
    answer, and enough of those answers are right (graded by the environment's verifier; the model card's
    held-out accuracy is measured by `nemotron3 eval envs` on 30 tasks)."""
    import openai
    from server_utils import live_server
    from nemotron3.engine import LLMEngine
    from nemotron3.server import create_app
    from nemotron3.train.envs import get_env, execute_demo_tool
    tok = load_tokenizer(DEFAULT_MODEL)
    env = get_env("calc")
    engine = LLMEngine(pico, tok, max_num_seqs=2, max_model_len=2048)
    correct = 0
    with live_server(create_app(engine, served_model_name="pico")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for task in env.tasks("test", CALC_TASKS):
            messages = list(task.messages)
            r = client.chat.completions.create(model="pico", messages=messages, tools=task.tools, temperature=0,
                                               max_tokens=200)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", choice.message
            call = choice.message.tool_calls[0]
            assert call.function.name == "calculator"
            args = json.loads(call.function.arguments)
            assert set(args) == {"expression"}
            result = execute_demo_tool("calculator", args)
            messages += [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": result}]
            final = client.chat.completions.create(model="pico", messages=messages, tools=task.tools,
                                                   temperature=0, max_tokens=200).choices[0]
            assert final.finish_reason == "stop" and final.message.content.strip()
            correct += env.verify(task, final.message.content)
    assert correct >= CALC_MIN_CORRECT, f"{correct} of {CALC_TASKS} held-out calc tasks right"


def test_pico_nvfp4_copy_is_quantized_and_close(pico):
    """models/pico-nvfp4 (nvfp4-mixed, ModelOpt layout) loads into the normal model with packed NVFP4 / FP8
    modules and predicts like the bf16 model (top-1 agreement on a chat prompt)."""
    from nemotron3.quant.linear import FP8Linear
    from nemotron3.quant.quantize import NVFP4Experts
    path = DEFAULT_MODEL.parent / "pico-nvfp4"
    q = nemotron3.load(path)
    kinds = {type(m) for m in q.modules()}
    assert NVFP4Experts in kinds and FP8Linear in kinds            # the mixed recipe: NVFP4 experts, FP8 linears
    tok = load_tokenizer(path)
    text = tok.apply_chat_template([{"role": "user", "content": "Convert 2.5 km to meters."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        a, b = pico(ids)[0].float(), q(ids)[0].float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8

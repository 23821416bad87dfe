"""The embedded default model (models/pico): loads with its tokenizer, has every architectural feature,
generates deterministically, and MTP self-speculative decoding on it is lossless."""
import json
from pathlib import Path

import pytest
import torch

import nemotron3
from nemotron3.cli import DEFAULT_MODEL
from nemotron3.engine import LLM, SamplingParams
from nemotron3.train.tokenizer import load_tokenizer

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

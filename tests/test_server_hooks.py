"""The engine hook the server's tool_choice falls back on (a tokenizer without call tokens; otherwise a grammar
forces the calls): `SamplingParams.answer_prefix_ids` forces the first tokens
of the answer (right after `</think>`, or at the start when the prompt closed the think block), also under
MTP speculative decoding and with a thinking budget."""
import pytest

from engine_utils import one_thread, tiny_model  # noqa: F401
from nemotron3.engine import LLM, SamplingParams
from nemotron3.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(server_model_dir):
    return load_tokenizer(server_model_dir)


@pytest.mark.parametrize("k", [0, 2])
def test_answer_prefix_after_forced_end_of_thinking(tok, k):
    llm = LLM(tiny_model(3, vocab_size=len(tok)), tokenizer=tok, num_speculative_tokens=k, max_model_len=256)
    prefix = tok.encode("<tool_call>\n<function=get_weather>\n")
    end = tok.token_to_id("</think>")
    msgs = [{"role": "user", "content": "weather?"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, thinking_budget=3,
                                        answer_prefix_ids=prefix))[0].outputs[0]
    i = out.token_ids.index(end)
    assert 3 <= i <= 4 and out.token_ids[i + 1:i + 1 + len(prefix)] == prefix
    off = llm.chat(msgs, SamplingParams(temperature=0.9, seed=1, max_tokens=12, ignore_eos=True, reasoning_mode="off",
                                        answer_prefix_ids=prefix))[0].outputs[0]
    assert off.token_ids[:len(prefix)] == prefix


def test_speculation_does_not_change_the_forced_output(tok):
    outs = []
    for k in (0, 2):
        llm = LLM(tiny_model(3, vocab_size=len(tok)), tokenizer=tok, num_speculative_tokens=k, max_model_len=256)
        outs.append(llm.chat([{"role": "user", "content": "weather?"}],
                             SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, thinking_budget=2,
                                            answer_prefix_ids=tok.encode("<tool_call>\n<function=")))[0]
                    .outputs[0].token_ids)
    assert outs[0] == outs[1]


def test_answer_prefix_validation():
    with pytest.raises(ValueError, match="answer_prefix_ids"):
        SamplingParams(answer_prefix_ids=[1, -2])

"""Reasoning budgets (`</think>` forced after N thinking tokens, line-finishing grace), modes, counting;
and the text side of the engine: chat template, detokenization, stop strings."""
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from engine_utils import one_thread, reference_greedy, tiny_model  # noqa: F401
from nemotron3.engine import LLM, ReasoningTokens, SamplingParams, ThinkingBudget
from nemotron3.engine.reasoning import effective_budget

THINK, END = 6, 7


@pytest.fixture(scope="module")
def model():
    m = tiny_model(2)
    with torch.no_grad():
        m.lm_head.weight[END].zero_()            # the model never ends thinking by itself
    return m


def where_forced(output, budget, newline_ids):
    """The rule, written out: after `budget` thinking tokens, `</think>` comes right after a token with a
    newline, or after ceil(10% of budget) more tokens."""
    grace = math.ceil(0.1 * budget)
    for i in range(budget, len(output) + 1):
        if (i == 0 or output[i - 1] in newline_ids) or i >= budget + grace:
            return i
    return None


def run(model, prompt, newline_ids, k=0, **params):
    rt = ReasoningTokens(THINK, END, frozenset(newline_ids))
    llm = LLM(model, reasoning_tokens=rt, num_speculative_tokens=k, medium_thinking_budget=12)
    return llm.generate([prompt], SamplingParams(temperature=0, ignore_eos=True, **params))[0]


@pytest.mark.parametrize("budget", [0, 5, 20])
@pytest.mark.parametrize("newlines", ["none", "all", "some"])
def test_budget_forces_end_of_thinking_at_the_right_token(model, budget, newlines):
    prompt = [12, 40, 41, THINK]
    free = reference_greedy(model, prompt, 40)
    assert END not in free
    newline_ids = {"none": set(), "all": set(range(96)), "some": set(free[budget:budget + 3:2])}[newlines]
    out = run(model, prompt, newline_ids, thinking_budget=budget, max_tokens=40)
    toks = out.outputs[0].token_ids
    f = where_forced(free, budget, newline_ids)
    assert toks[:f] == free[:f] and toks.index(END) == f
    assert out.outputs[0].reasoning_tokens == out.metrics.reasoning_tokens == f
    if newlines == "none":
        assert f == budget + math.ceil(0.1 * budget)
    if newlines == "all":
        assert f == budget


def test_budget_with_speculative_decoding_matches(model):
    prompt = [12, 40, 41, THINK]
    plain = run(model, prompt, {50, 60, 70}, thinking_budget=9, max_tokens=30)
    for k in (1, 3):
        spec = run(model, prompt, {50, 60, 70}, k=k, thinking_budget=9, max_tokens=30)
        assert spec.outputs[0].token_ids == plain.outputs[0].token_ids
        assert spec.metrics.reasoning_tokens == plain.metrics.reasoning_tokens


def test_regular_mode_has_no_budget_and_counts(model):
    prompt = [12, 40, 41, THINK]
    out = run(model, prompt, set(), max_tokens=25)
    assert END not in out.outputs[0].token_ids and out.metrics.reasoning_tokens == 25


def test_medium_mode_default_budget_and_half_max_tokens(model):
    prompt = [12, 40, 41, THINK]
    out = run(model, prompt, set(), reasoning_mode="medium", max_tokens=40)     # engine default: 12
    assert out.outputs[0].token_ids.index(END) == 12 + 2
    out = run(model, prompt, set(), reasoning_mode="medium", max_tokens=10)     # capped at max_tokens // 2
    assert out.outputs[0].token_ids.index(END) == 5 + 1
    assert effective_budget("medium", None, None) == 1024 and effective_budget("regular", None, 99) is None


def test_off_mode_bans_opening_a_think_block(model):
    prompt = [12, 40, 41, THINK, END]                     # the template's empty think block
    free = reference_greedy(model, prompt, 20)
    rt_start = free[3]                                     # pretend the 4th free token is `<think>`
    llm = LLM(model, reasoning_tokens=ReasoningTokens(rt_start, END, frozenset()))
    out = llm.generate([[12, 40, 41, rt_start, END]], SamplingParams(temperature=0, max_tokens=20,
                                                                    reasoning_mode="off", ignore_eos=True))[0]
    assert rt_start not in out.outputs[0].token_ids and out.metrics.reasoning_tokens == 0


def test_thinking_budget_state_machine():
    rt = ReasoningTokens(THINK, END, frozenset({9}))
    b = ThinkingBudget(rt, 3, "regular", [1, THINK])
    assert b.inside and b.forced() is None
    for t in (20, 21, 22):
        b.advance(t)
    assert b.count == 3 and b.forced() is None             # mid-line: grace of ceil(0.3) = 1 token
    b.advance(9)                                           # a newline token inside the grace
    assert b.forced() == END
    b.advance(END)
    assert not b.inside and b.forced() is None and b.count == 4
    closed = ThinkingBudget(rt, 3, "off", [THINK, 5, END])
    assert not closed.inside and closed.constraint().banned == (THINK,)
    opened_by_model = ThinkingBudget(rt, 0, "regular", [1, 2])
    opened_by_model.advance(THINK)
    assert opened_by_model.forced() == END


# ---- text: chat template, detokenization, stop strings ----

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from nemotron3.tokenizer import train_tokenizer
    src = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    texts = [src.read_text()] * 2 + ["Hello, world! caf\u00e9 \u4e16\u754c\n"] * 20
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 400, out)
    return out


@pytest.fixture(scope="module")
def text_llm(tok_dir):
    from nemotron3.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    return LLM(tiny_model(4, vocab_size=len(tok)), tokenizer=tok, max_model_len=256)


def test_text_prompts_detokenize_incrementally(text_llm):
    out = text_llm.generate("def wrap(text):", SamplingParams(temperature=1.0, seed=3, max_tokens=30,
                                                              ignore_eos=True, skip_special_tokens=False))[0]
    c = out.outputs[0]
    assert c.text == text_llm.tokenizer.decode(c.token_ids) and out.prompt == "def wrap(text):"


def test_stop_strings(text_llm):
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, skip_special_tokens=False)
    full = text_llm.generate("Hello", sp)[0].outputs[0].text
    assert len(full) > 8
    stop = full[5:8]
    first = full.index(stop)
    cut = text_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                                    skip_special_tokens=False))[0].outputs[0]
    assert cut.text == full[:first] and cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = text_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop,
                                                     include_stop_str_in_output=True,
                                                     skip_special_tokens=False))[0].outputs[0]
    assert kept.text == full[:first + len(stop)]



def test_stop_strings_wait_for_min_tokens_and_stop_token_text(text_llm):
    """vLLM: a stop string counts only where it ends in the text of a token past `min_tokens`; a stop
    token's own text is in the output only with include_stop_str_in_output."""
    tok = text_llm.tokenizer
    sp = dict(temperature=0, max_tokens=30, ignore_eos=True, skip_special_tokens=False)
    c = text_llm.generate("Hello", SamplingParams(**sp))[0].outputs[0]
    texts = [tok.decode(c.token_ids[:t], skip_special_tokens=False) for t in range(31)]
    t1 = next(t for t in range(1, 31) if len(texts[t]) > len(texts[t - 1]))     # the first token with text
    stop = texts[t1][-1]
    later = next(t for t in range(t1 + 2, 31) if stop in texts[t][len(texts[t - 1]) - len(stop) + 1:])
    out = text_llm.generate("Hello", SamplingParams(stop=[stop], min_tokens=t1, **sp))[0].outputs[0]
    assert len(out.token_ids) == later and out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == texts[later][:texts[later].index(stop, len(texts[later - 1]) - len(stop) + 1)]
    first = next(t for t in range(t1 + 1, 31) if c.token_ids.index(c.token_ids[t - 1]) == t - 1
                 and len(texts[t]) > len(texts[t - 1]) and not texts[t].endswith("\ufffd"))
    stop_id = c.token_ids[first - 1]
    for inc in (False, True):
        out = text_llm.generate("Hello", SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=inc,
                                                        **sp))[0].outputs[0]
        assert out.token_ids == c.token_ids[:first] and out.stop_reason == stop_id
        assert out.text == texts[first if inc else first - 1]

def test_chat_uses_the_template_and_reasoning_modes(text_llm):
    tok = text_llm.tokenizer
    msgs = [{"role": "user", "content": "hi"}]
    on = text_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, thinking_budget=4))[0]
    assert on.prompt_token_ids == tok.encode(tok.apply_chat_template(msgs))
    assert tok.decode(on.prompt_token_ids).endswith("<think>\n")
    end = on.outputs[0].token_ids.index(tok.token_to_id("</think>"))   # forced: budget 4, grace 1
    assert 4 <= end <= 5 and on.metrics.reasoning_tokens == end
    off = text_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, reasoning_mode="off"))[0]
    assert tok.decode(off.prompt_token_ids).endswith("<think></think>")
    assert tok.token_to_id("<think>") not in off.outputs[0].token_ids and off.metrics.reasoning_tokens == 0

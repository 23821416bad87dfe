"""Grammar-constrained decoding (engine/grammar.py, engine/tool_grammar.py) on a random-weights model, whose
unconstrained output is garbage: every constrained output must still parse and validate."""
import json
from pathlib import Path

import pytest

from engine_utils import one_thread, tiny_model  # noqa: F401 - fixture
from schema_check import errors
from nemotron3.chat.parsers import parse_output
from nemotron3.engine import LLM, RequestError, SamplingParams, StructuredOutputs
from nemotron3.engine.tool_grammar import ToolGrammarError, call_grammar
from nemotron3.tokenizer import load_tokenizer

PICO = Path(__file__).resolve().parents[1] / "models" / "pico"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
                         "kind": {"enum": ["x", "y"]},
                         "inner": {"type": "object", "required": ["ok"], "additionalProperties": False,
                                   "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"],
                                                                                      "maxLength": 8}}}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7},
                   "opts": {"type": "object", "required": ["x"], "additionalProperties": False,
                            "properties": {"x": {"type": "boolean"}}}}}}},
         {"type": "function", "function": {"name": "calc", "parameters": {
             "type": "object", "properties": {"expr": {"type": "string", "maxLength": 30}}}}}]
SPECIAL = [i for i in range(12) if i not in (2, 5)]          # control tokens but the two EOS


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(PICO)


@pytest.fixture(scope="module")
def model():
    return tiny_model(0, vocab_size=8192)


def _params(i, **kw):
    return SamplingParams(max_tokens=160, temperature=[0, 1, 0.7][i % 3], seed=i, reasoning_mode="off", **kw)


@pytest.mark.parametrize("k", [0, 2])
def test_json_schema_always_valid(model, tok, k):
    llm = LLM(model, tokenizer=tok, num_speculative_tokens=k, max_num_seqs=4)
    so = StructuredOutputs(json=SCHEMA)
    outs = llm.generate(["hello"] * 6, [_params(i, structured_outputs=so) for i in range(6)])
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        assert errors(json.loads(c.text), SCHEMA) == [], c.text


def test_json_object_regex_choice(model, tok):
    llm = LLM(model, tokenizer=tok)
    specs = [StructuredOutputs(json_object=True), StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}"),
             StructuredOutputs(choice=["yes", "no"])]
    outs = llm.generate(["a", "b", "c"], [SamplingParams(max_tokens=200, reasoning_mode="off", seed=1,
                                                         structured_outputs=s) for s in specs])
    obj = json.loads(outs[0].outputs[0].text) if outs[0].outputs[0].finish_reason == "stop" else {}
    assert isinstance(obj, dict)
    import re
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[1].outputs[0].text)
    assert outs[2].outputs[0].text in ("yes", "no")


def test_allow_everything_grammar_is_exact(model, tok):
    """A grammar that allows every text gives the same greedy tokens as no grammar (control tokens and the
    lone-byte tokens that can break UTF-8 are banned in both runs: a text grammar allows neither)."""
    peaked = tiny_model(0, vocab_size=8192, lm_scale=20.0)      # no near-ties for rounding to flip
    partial = [i for i in range(12, 8192) if "\ufffd" in tok.decode([i])]
    base = dict(max_tokens=40, reasoning_mode="off", banned_token_ids=SPECIAL + partial)
    for k in (0, 2):
        runs = [LLM(peaked, tokenizer=tok, num_speculative_tokens=k).generate(["def f(x):"], SamplingParams(
            **base, **extra))[0].outputs[0].token_ids for extra in ({}, {"structured_outputs": StructuredOutputs(
                regex=r"(?s:.*)")})]
        assert runs[0] == runs[1] and len(runs[0]) == 40


def test_grammar_starts_after_think(model, tok):
    """Thinking is free; the answer after </think> follows the grammar (a budget closes the thinking)."""
    llm = LLM(model, tokenizer=tok)
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    out = llm.generate([prompt], SamplingParams(max_tokens=200, thinking_budget=8, seed=3, temperature=1.0,
                                                structured_outputs=StructuredOutputs(json=SCHEMA)))[0].outputs[0]
    think_end = tok.token_to_id("</think>")
    assert think_end in out.token_ids
    answer = tok.decode(out.token_ids[out.token_ids.index(think_end) + 1:], skip_special_tokens=True)
    assert errors(json.loads(answer), SCHEMA) == []


def test_bad_grammar_is_refused(model, tok):
    llm = LLM(model, tokenizer=tok)
    for so in (StructuredOutputs(json='{"type": '), StructuredOutputs(json={"type": "object", "properties": 3}),
               StructuredOutputs(regex="(")):
        with pytest.raises(RequestError) as e:
            llm.generate(["x"], SamplingParams(structured_outputs=so))
        assert e.value.param == "structured_outputs" and "invalid structured output" in str(e.value)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(json={}, regex="a")


def test_banned_tokens_never_appear(model, tok):
    llm = LLM(model, tokenizer=tok)
    outs = llm.generate(["x"] * 3, [SamplingParams(max_tokens=40, seed=i, temperature=1.0, logit_bias={8: 100.0},
                                                   banned_token_ids=[8]) for i in range(3)])
    assert all(8 not in o.outputs[0].token_ids for o in outs)


def _check_calls(text, tools, names):
    d = parse_output(text, False, tools, True)
    assert d.tool_calls, text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for c in d.tool_calls:
        assert c.name in names and c.well_formed, text
        assert errors(c.arguments, schemas[c.name]) == [], (text, c.arguments)
    return d


@pytest.mark.parametrize("k", [0, 2])
def test_forced_tool_calls_valid(model, tok, k):
    """tool_choice named / required: the whole answer is calls to the declared tools with schema-valid
    arguments, in the XML the parser reads."""
    llm = LLM(model, tokenizer=tok, num_speculative_tokens=k, max_num_seqs=4)
    open_, close = tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>")
    named = StructuredOutputs(grammar=call_grammar(TOOLS, open_, close, names=["get_weather"], parallel=False))
    required = StructuredOutputs(grammar=call_grammar(TOOLS, open_, close))
    params = [_params(i, structured_outputs=named if i % 2 else required) for i in range(8)]
    for i, o in enumerate(llm.generate(["call"] * 8, params)):
        c = o.outputs[0]
        text = tok.decode(c.token_ids, skip_special_tokens=False)
        if c.finish_reason == "length":            # a random model may go on calling (parallel): the calls it
            assert i % 2 == 0, text                # completed are still checked
            text = text[:text.rindex("</tool_call>") + len("</tool_call>")]
        else:
            assert c.finish_reason == "stop", c.text
        d = _check_calls(text, TOOLS, ["get_weather"] if i % 2 else ["get_weather", "calc"])
        assert len(d.tool_calls) == 1 or i % 2 == 0


def test_triggered_call_names_a_declared_tool(model, tok):
    """tool_choice auto: text is free, and once <tool_call> is emitted the call must name a declared tool
    (the bias makes the random model open calls all the time)."""
    llm = LLM(model, tokenizer=tok)
    open_, close = tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>")
    so = StructuredOutputs(grammar=call_grammar(TOOLS, open_, close, strict=False, triggered=True), trigger=open_)
    thinking = tok.encode("<|im_start|>assistant\n<think>\n")          # calls inside reasoning count too
    outs = llm.generate(["x", "y", thinking], [SamplingParams(max_tokens=120, seed=i, temperature=1.0,
                                                              logit_bias={open_: 30.0}, structured_outputs=so,
                                                              reasoning_mode="regular" if i == 2 else "off")
                                               for i in range(3)])
    for o in outs:
        text = tok.decode(o.outputs[0].token_ids, skip_special_tokens=False)
        assert "<tool_call>" in text
        for block in text.split("<tool_call>")[1:]:
            assert block.startswith("\n<function=get_weather>\n") or block.startswith("\n<function=calc>\n") \
                or len(tok.encode(block)) < 4, block


def test_tool_grammar_refuses_what_it_cannot_express():
    bad = [{"name": "f", "input_schema": {"type": "object", "required": ["a"], "properties": {}}},
           {"name": "g", "input_schema": {"type": "object", "properties": {"a b": {"type": "string"}}}}]
    for t in bad:
        with pytest.raises(ToolGrammarError):
            call_grammar([t], 8, 9)

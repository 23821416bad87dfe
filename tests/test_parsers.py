"""Reasoning / tool-call parsing, whole and streamed in arbitrary pieces (which must agree)."""
import random

import pytest

from nemotron3.chat.parsers import StreamParser, parse_output

TOOLS = [{"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}, "precision": {"type": "integer"}}}}}]

CALL = ("<tool_call>\n<function=calculator>\n<parameter=expression>\n2 * (3 + 4)\n</parameter>\n"
        "<parameter=precision>\n3\n</parameter>\n</function>\n</tool_call>")


def streamed(text, thinking=True, tools=TOOLS, seed=0):
    rng = random.Random(seed)
    p, out = StreamParser(thinking, tools), None
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        pieces.append(text[i:i + n])
        i += n
    from nemotron3.chat.parsers import Delta
    out = Delta()
    for piece in pieces:
        out += p.feed(piece)
    out += p.finish()
    return out


@pytest.mark.parametrize("seed", range(5))
def test_reasoning_then_answer(seed):
    text = "Let me think.\n2+2 is 4.\n</think>\nThe answer is 4."
    whole = parse_output(text)
    assert whole.reasoning == "Let me think.\n2+2 is 4." and whole.content == "The answer is 4."
    s = streamed(text, seed=seed)
    assert s.reasoning.strip() == whole.reasoning and s.content == whole.content


def test_reasoning_that_never_closes_stays_reasoning():
    out = parse_output("I keep thinking and thinking")
    assert out.reasoning == "I keep thinking and thinking" and out.content == "" and not out.tool_calls


def test_thinking_off_is_all_content_and_leading_think_is_still_parsed():
    assert parse_output("Just the answer.", thinking=False).content == "Just the answer."
    out = parse_output("<think>hmm</think>Answer", thinking=False)
    assert out.reasoning == "hmm" and out.content == "Answer"


@pytest.mark.parametrize("seed", range(5))
def test_tool_call_after_reasoning_with_types(seed):
    text = "I should use the calculator.\n</think>\n" + CALL
    for out in (parse_output(text), streamed(text, seed=seed)):
        assert len(out.tool_calls) == 1
        call = out.tool_calls[0]
        assert call.name == "calculator"
        assert call.arguments == {"expression": "2 * (3 + 4)", "precision": 3}   # string kept, integer parsed
        assert out.content.strip() == ""


def test_tool_call_inside_unclosed_reasoning_ends_it():
    out = parse_output("thinking about it " + CALL)
    assert out.reasoning == "thinking about it " and out.tool_calls[0].name == "calculator"


def test_several_calls_and_text_between():
    text = "</think>Calling twice.\n" + CALL + "\n" + CALL.replace("2 * (3 + 4)", "1/3")
    out = parse_output(text)
    assert [c.arguments["expression"] for c in out.tool_calls] == ["2 * (3 + 4)", "1/3"]
    assert out.content == "Calling twice."
    assert out.tool_calls[0].id != out.tool_calls[1].id


@pytest.mark.parametrize("bad", [
    "<tool_call>\n<function=calc>\n<parameter=x>1</parameter>\n</tool_call>",          # no </function>
    "<tool_call>\nnot xml at all\n</tool_call>",
    "<tool_call>\n<function=calc>\n<parameter=x>\n1\n</parameter>\n</function>",        # never closed
])
def test_malformed_calls_fall_back_to_content(bad):
    out = parse_output("</think>" + bad)
    assert not out.tool_calls and out.content.strip() == bad.strip()


def test_json_values_and_untyped_tools():
    text = ('</think><tool_call>\n<function=search>\n<parameter=filters>\n{"lang": "en", "n": 2}\n</parameter>\n'
            '<parameter=query>\nhello\n</parameter>\n</function>\n</tool_call>')
    call = parse_output(text, tools=None).tool_calls[0]
    assert call.arguments == {"filters": {"lang": "en", "n": 2}, "query": "hello"}
    assert '"lang": "en"' in call.arguments_json


def test_text_that_only_looks_like_a_tag_is_released():
    p = StreamParser(thinking=False, tools=TOOLS)
    assert p.feed("a < b and <tool").content == "a < b and "
    assert p.feed("box>").content == "<toolbox>"
    assert p.finish().content == ""


def test_tools_disabled_leaves_xml_as_content():
    out = parse_output("</think>" + CALL, parse_tools=False)
    assert not out.tool_calls and out.content == CALL

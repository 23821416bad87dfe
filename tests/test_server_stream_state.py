"""The streaming state forwards the parser's deltas unchanged: for every fixture output (text between and
after tool calls, malformed calls, reasoning), streamed content and calls equal the non-streamed parse, at
every chunking of the text."""
import json
from pathlib import Path

import pytest

from nemotron3.chat.parsers import StreamParser, parse_output
from nemotron3.server.serving import ChatStreamState

FIXTURE = json.loads((Path(__file__).parent / "data" / "parser_vllm_cases.json").read_text(encoding="utf-8"))
BETWEEN = ("R\n</think>\nLet me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
           "</function>\n</tool_call>\nBetween.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n"
           "</parameter>\n</function>\n</tool_call>\nAfter.  \n")
CASES = [(c["name"], c["text"], c.get("thinking", True), c.get("parse_tools", True)) for c in FIXTURE["cases"]] + \
        [("text_between_and_after_calls", BETWEEN, True, True)]


def streamed(text, thinking, parse_tools, size):
    st = ChatStreamState(StreamParser(thinking, FIXTURE["tools"], parse_tools), parallel=True)
    content, reasoning, calls = "", "", []
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    for i, piece in enumerate(pieces):
        d = st.parser.feed(piece)
        if i == len(pieces) - 1:
            d += st.parser.finish()
        for delta in st.deltas(d):
            content += delta.get("content", "")
            reasoning += delta.get("reasoning_content", "")
            calls += [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                      for c in delta.get("tool_calls", [])]
    return content, reasoning, calls


@pytest.mark.parametrize("name,text,thinking,parse_tools", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("size", [1, 3, 7, 10_000])
def test_streamed_equals_non_streamed(name, text, thinking, parse_tools, size):
    whole = parse_output(text, thinking, FIXTURE["tools"], parse_tools)
    expected = (whole.content, whole.reasoning, [(i, c.name, c.arguments) for i, c in enumerate(whole.tool_calls)])
    assert streamed(text, thinking, parse_tools, size) == expected


def test_text_between_calls_keeps_its_newline():
    content, _, calls = streamed(BETWEEN, True, True, 1)
    assert content == "Let me check.\nBetween.\nAfter."          # as parse_output: trailing layout dropped
    assert [c[1] for c in calls] == ["get_weather", "get_weather"]


def test_only_the_first_call_when_not_parallel():
    st = ChatStreamState(StreamParser(True, FIXTURE["tools"]), parallel=False)
    d = st.parser.feed(BETWEEN)
    d += st.parser.finish()
    out = st.deltas(d)
    assert [x["tool_calls"][0]["index"] for x in out if "tool_calls" in x] == [0] and st.n_calls == 1

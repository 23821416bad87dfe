"""Regenerate ``tests/data/chat_template_nvidia.json``: conversation shapes rendered by NVIDIA's Nano chat template.

Not part of the test suite, and it ships none of NVIDIA's template (it is under the NVIDIA Open Model License,
whose redistribution terms we do not take on; the rendered strings are data): it needs a local copy of NVIDIA's published
``chat_template.jinja`` for Nemotron 3 Nano (the one used for the fixture: llama.cpp's
``models/templates/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja`` at ggml-org/llama.cpp commit c15395f73, itself
the template of https://huggingface.co/nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 with CRLF line ends made LF;
its sha256 is written to the fixture). It renders every case below with ``transformers``' own Jinja sandbox
(the environment vLLM and ``apply_chat_template`` use) and writes the messages, tools, keyword arguments and
rendered strings to the JSON fixture. ``tests/test_chat_template.py`` renders the same cases with our template
and requires byte-identical strings.

    python tests/data/make_chat_template_fixture.py /path/to/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("chat_template_nvidia.json")
SOURCE = ("https://github.com/ggml-org/llama.cpp/blob/c15395f73c42805d9609a55749a1d4b5b2251379/models/templates/"
          "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja (= chat_template.jinja of "
          "https://huggingface.co/nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16, NVIDIA Open Model License)")

SYS = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is 2+2?"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "days": {"type": "integer", "enum": [1, 3]}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "  Search the web.\n",
    "parameters": {"type": "object", "properties": {
        "query": {"description": " what to look for ", "type": "string", "minLength": 1},
        "filters": {"type": "object", "properties": {"lang": {"type": "string"}}, "additionalProperties": False},
        "mode": {"enum": ["fast", "deep"], "type": "string", "default": "fast", "nullable": True},
        "tags": {"type": ["array", "null"], "items": {"type": "string"}},
        "limit": {"type": "number", "minimum": 0.5, "maximum": 10}},
        "required": ["query"], "additionalProperties": False, "$defs": {"x": {"type": "string"}}},
    "strict": True}}
BARE = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}


def call(name, args):
    return {"id": "call_" + name, "type": "function", "function": {"name": name, "arguments": args}}


def weather_turns(reasoning="Call the tool.", content=""):
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": content, "reasoning_content": reasoning,
             "tool_calls": [call("get_weather", {"city": "Paris", "days": 3})]},
            {"role": "tool", "tool_call_id": "call_get_weather", "content": "18C, clear"}]


HISTORY = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "reasoning_content": "Greet back.", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n4"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "reasoning_content": "Polite.", "content": "You're welcome."},
]
AGENT = [  # two tool rounds, an answer, then a new user question: the whole first exchange is history
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking Paris first.", "reasoning_content": "Two cities.",
     "tool_calls": [call("get_weather", {"city": "Paris"})]},
    {"role": "tool", "content": "18C"},
    {"role": "assistant", "content": "", "reasoning_content": "Now Rome.\n",
     "tool_calls": [call("get_weather", {"city": "Rome", "days": 1})]},
    {"role": "tool", "content": "24C"},
    {"role": "assistant", "content": "Paris 18C, Rome 24C.", "reasoning_content": "Summarise."},
    {"role": "user", "content": "And tomorrow?"},
]

CASES = [
    ("system_user_thinking_on", [SYS, USER], None, {}),
    ("system_user_thinking_off", [SYS, USER], None, {"enable_thinking": False}),
    ("no_system_message", [USER], None, {}),
    ("no_generation_prompt", [SYS, USER], None, {"add_generation_prompt": False}),
    ("multi_turn_history_reasoning_dropped", HISTORY, None, {"add_generation_prompt": False}),
    ("multi_turn_history_reasoning_kept", HISTORY, None,
     {"add_generation_prompt": False, "truncate_history_thinking": False}),
    ("reasoning_and_content_verbatim", [USER, {"role": "assistant", "reasoning_content": "R\n", "content": "\nAnswer"}],
     None, {"add_generation_prompt": False}),
    ("whitespace_only_reasoning_is_none", [USER, {"role": "assistant", "reasoning_content": " \n", "content": " 4 "}],
     None, {"add_generation_prompt": False}),
    ("answer_without_reasoning", [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure?"},
                                  {"role": "assistant", "content": ""}], None, {"add_generation_prompt": False}),
    ("tools_call_and_result", [{"role": "system", "content": "Be brief."}] + weather_turns(), [WEATHER], {}),
    ("tools_without_system_message", weather_turns(), [WEATHER], {}),
    ("multiple_tool_results", weather_turns()[:2] + [
        {"role": "tool", "content": "18C"}, {"role": "tool", "content": "{\"sky\": \"clear\"}"}], [WEATHER], {}),
    ("tool_call_with_content_kept", weather_turns("I will check.\n", "\nLet me look that up.\n"), [WEATHER],
     {"enable_thinking": False}),
    ("non_string_arguments", [USER, {"role": "assistant", "content": "", "tool_calls": [call("search", {
        "query": "x", "flag": True, "none": None, "ratio": 1.5, "count": 3, "big": 1e20, "list": [1, "a", None],
        "obj": {"k": [True, None], "é": "ü"}, "empty": ""})]}], [SEARCH], {}),
    ("schema_extra_keys", [SYS, USER], [SEARCH, BARE, WEATHER], {}),
    ("agentic_history_dropped", AGENT, [WEATHER], {}),
    ("agentic_history_kept", AGENT, [WEATHER], {"truncate_history_thinking": False}),
    ("agentic_ongoing_turn", AGENT[:5], [WEATHER], {"enable_thinking": False}),
    ("history_call_inline_think", [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>plan</think>\n Calling. ", "tool_calls": [call("ping", {})]},
        {"role": "tool", "content": "pong"},
        {"role": "assistant", "content": "text <think>unclosed", "tool_calls": [call("ping", {})]},
        {"role": "tool", "content": "pong"},
        {"role": "assistant", "content": "only </think> closed"},
        {"role": "user", "content": "b"}], [BARE], {}),
    ("system_mid_conversation_and_unicode", [SYS, {"role": "user", "content": "Grüße 🌍"},
                                             {"role": "assistant", "content": "Hallo!"},
                                             {"role": "system", "content": "Switch to English."},
                                             {"role": "user", "content": "Hi"}], None, {}),
]


def main(template_path: str) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    template = Path(template_path).read_text(encoding="utf-8")
    cases = []
    for name, messages, tools, kwargs in CASES:
        kw = {"add_generation_prompt": True, **kwargs}
        rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template, **kw)
        cases.append({"name": name, "messages": messages, "tools": tools, "kwargs": kw, "expected": rendered[0]})
    OUT.write_text(json.dumps({
        "source": SOURCE, "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "generator": "tests/data/make_chat_template_fixture.py (transformers render_jinja_template)",
        "cases": cases}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])

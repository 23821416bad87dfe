"""Chat template: exact renderings, and identical output through transformers."""

import json

import pytest

from nemotron3.chat import CHAT_TEMPLATE, render_chat
from nemotron3.tokenizer import load_tokenizer, train_tokenizer

SYS = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is 2+2?"}

HISTORY = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "reasoning_content": "Greet back.", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n4"},  # inline reasoning
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "reasoning_content": "Polite.", "content": "You're welcome."},
]

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer", "enum": [1, 3]},
            },
            "required": ["city"],
        },
    },
}]
CALL_ARGS = {"city": "Paris", "days": 3, "opts": {"metric": True}}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}}]},
    {"role": "tool", "content": "18C"},
    {"role": "tool", "content": "{\"sky\": \"clear\"}"},
]

TOOLS_SYSTEM = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    "<function>\n<name>get_weather</name>\n<description>Get the current weather.</description>\n<parameters>\n"
    "<parameter>\n<name>city</name>\n<type>string</type>\n<description>City name</description>\n</parameter>\n"
    "<parameter>\n<name>days</name>\n<type>integer</type>\n<enum>[1, 3]</enum>\n</parameter>\n"
    "<required>[\"city\"]</required>\n</parameters>\n</function>\n</tools>\n\n"
    "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    "within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call, "
    "but NOT after\n- If there is no function call available, answer the question like normal with your current "
    "knowledge and do not tell the user about function calls\n</IMPORTANT><|im_end|>\n"
)
TOOL_TURNS = (
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nCall the tool.\n</think>\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
    "<parameter=opts>\n{\"metric\": true}\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n{\"sky\": \"clear\"}\n"
    "</tool_response>\n<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n"
)


def test_plain_prompt_thinking_on_off():
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert render_chat([SYS, USER]) == head + "<|im_start|>assistant\n<think>\n"
    assert render_chat([SYS, USER], enable_thinking=False) == head + "<|im_start|>assistant\n<think></think>"
    assert render_chat([SYS, USER], add_generation_prompt=False) == head
    # the system turn is always present, empty if none is given
    assert render_chat([USER]) == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                   "<|im_start|>assistant\n<think>\n")


def test_history_reasoning_truncated_and_kept():
    head = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    truncated = render_chat(HISTORY, add_generation_prompt=False)
    assert truncated == (
        head + "<|im_start|>assistant\n<think></think>Hello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think></think>4<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n<think>\nPolite.\n</think>\nYou're welcome.<|im_end|>\n"
    )
    kept = render_chat(HISTORY, add_generation_prompt=False, truncate_history_thinking=False)
    assert kept == (
        head + "<|im_start|>assistant\n<think>\nGreet back.\n</think>\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nAdd them.\n</think>\n4<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n<think>\nPolite.\n</think>\nYou're welcome.<|im_end|>\n"
    )
    # no reasoning at all: an empty think block is synthesised; "reasoning" is an accepted alias
    plain = [USER, {"role": "assistant", "content": "4"}]
    assert render_chat(plain, add_generation_prompt=False).endswith("<|im_start|>assistant\n<think></think>4<|im_end|>\n")
    aliased = [USER, {"role": "assistant", "content": "4", "reasoning": "r"}]
    assert render_chat(aliased, add_generation_prompt=False).endswith("<think>\nr\n</think>\n4<|im_end|>\n")


def test_tools_call_and_results():
    system = {"role": "system", "content": "Be brief."}
    out = render_chat([system] + TOOL_CHAT, tools=TOOLS)
    assert out == TOOLS_SYSTEM + TOOL_TURNS
    # arguments given as a JSON string render identically; the call turn precedes no user turn,
    # so its reasoning is kept even with truncate_history_thinking
    as_string = json.loads(json.dumps(TOOL_CHAT))
    as_string[1]["tool_calls"][0]["function"]["arguments"] = json.dumps(CALL_ARGS)
    assert render_chat([system] + as_string, tools=TOOLS) == out
    # tools without a system message: the catalogue opens the system turn
    assert render_chat(TOOL_CHAT, tools=TOOLS).startswith("<|im_start|>system\n# Tools\n\n")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_tok")
    train_tokenizer(["def f(x):\n    return x\n"] * 4 + ["Hello, world! The weather is nice."] * 4, 300, d)
    return d


CASES = [
    ([SYS, USER], None, {}),
    ([SYS, USER], None, {"enable_thinking": False}),
    (HISTORY, None, {"add_generation_prompt": False}),
    (HISTORY, None, {"add_generation_prompt": False, "truncate_history_thinking": False}),
    ([{"role": "system", "content": "Be brief."}] + TOOL_CHAT, TOOLS, {}),
    (TOOL_CHAT, TOOLS, {"enable_thinking": False}),
]


def test_wrapper_uses_saved_template(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    for messages, tools, kw in CASES:
        kw = {"add_generation_prompt": True, **kw}
        text = tok.apply_chat_template(messages, tools=tools, **kw)
        assert text == render_chat(messages, tools=tools, **kw)
        assert tok.decode(tok.apply_chat_template(messages, tools=tools, tokenize=True, **kw)) == text


def test_transformers_renders_identically(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    tok = load_tokenizer(tok_dir)
    for messages, tools, kw in CASES:
        kw = {"add_generation_prompt": True, **kw}
        theirs = hf.apply_chat_template(messages, tools=tools, tokenize=False, **kw)
        assert theirs == tok.apply_chat_template(messages, tools=tools, **kw)
        assert hf.encode(theirs) == tok.encode(theirs)
        assert hf.encode(theirs).count(tok.im_start_id) == theirs.count("<|im_start|>")

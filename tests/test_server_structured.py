"""Structured outputs and tool calls that cannot miss, through the official `openai` and `anthropic` clients, on a
random-weights model (its unconstrained output is garbage): every constrained answer parses and validates."""
import json
import warnings
from typing import Literal

import anthropic
import openai
import pytest
from pydantic import BaseModel, Field

from engine_utils import one_thread  # noqa: F401
from schema_check import errors
from server_utils import live_server
from nemotron3.checkpoint import load
from nemotron3.engine import LLMEngine
from nemotron3.server import create_app
from nemotron3.tokenizer import load_tokenizer

WEATHER = {"type": "object", "required": ["city", "days"],
           "properties": {"city": {"type": "string", "maxLength": 16},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7},
                          "hourly": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "required": ["a", "b"],
             "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                            "b": {"type": "integer", "minimum": -99, "maximum": 99}}}}}]
NESTED = {"type": "object", "additionalProperties": False, "required": ["title", "level", "items"],
          "properties": {"title": {"type": "string", "maxLength": 12},
                         "level": {"enum": ["low", "mid", "high"]},
                         "items": {"type": "array", "maxItems": 3, "items": {
                             "type": "object", "additionalProperties": False, "required": ["id", "ok"],
                             "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                            "ok": {"type": "boolean"}}}}}}
OFF = {"chat_template_kwargs": {"enable_thinking": False}}


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user"]
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


@pytest.fixture(scope="module")
def server(server_model_dir):
    tok = load_tokenizer(server_model_dir)
    with warnings.catch_warnings():            # 2048 > the tiny config's 1024: room for the tool prompts
        warnings.simplefilter("ignore")
        engine = LLMEngine(load(server_model_dir), tok, max_num_seqs=4, max_model_len=2048)
    with live_server(create_app(engine, served_model_name="tiny")) as url:
        yield url, engine, tok


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server):
    return anthropic.Anthropic(base_url=server[0], api_key="unused", max_retries=0, timeout=120)


def user(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("extra", [OFF, {}])
def test_parse_pydantic(client, extra):
    """`chat.completions.parse` with a pydantic model returns the parsed object, thinking off and on."""
    for seed in range(3):
        r = client.chat.completions.parse(model="tiny", messages=user("Who is Ann?"), response_format=Person,
                                          max_tokens=300, seed=seed, temperature=1.0, extra_body=extra)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop", msg.content
        assert isinstance(msg.parsed, Person) and not msg.tool_calls


def test_varied_prompts_all_valid(client):
    """Chat and completions, json_schema (nested, enums, arrays, required) and json_object: 100% valid."""
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": NESTED, "strict": True}}
    prompts = ["Summarise the news.", "List three things.", "Hello!", "Write a poem.", "What is 2+2?"]
    for i, p in enumerate(prompts):
        r = client.chat.completions.create(model="tiny", messages=user(p), response_format=fmt, max_tokens=300,
                                           seed=i, temperature=1.0, extra_body=OFF if i % 2 else {})
        c = r.choices[0]
        assert c.finish_reason == "stop" and errors(json.loads(c.message.content), NESTED) == [], c.message.content
        r = client.completions.create(model="tiny", prompt=p, extra_body={"response_format": fmt}, max_tokens=300,
                                      seed=i, temperature=0.8 if i % 2 else 0.0)
        assert errors(json.loads(r.choices[0].text), NESTED) == [], r.choices[0].text
    # json_object: the answer is a JSON object (the random model opens {} and closes it within the budget)
    r = client.chat.completions.create(model="tiny", messages=user("JSON please"), response_format={
        "type": "json_object"}, max_tokens=400, temperature=0, extra_body=OFF)
    c = r.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:                                  # cut by max_tokens, as vLLM: finish_reason length, text incomplete
        assert c.finish_reason == "length" and c.message.content.startswith("{")


def test_streamed_structured(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": NESTED}}
    chunks = list(client.chat.completions.create(model="tiny", messages=user("Stream it"), response_format=fmt,
                                                 max_tokens=300, stream=True, seed=5, temperature=1.0,
                                                 extra_body=OFF))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert errors(json.loads(text), NESTED) == []


@pytest.mark.parametrize("bad,msg", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                     "properties": {"a": {"type": "nope"}}}}},
     "invalid structured output"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a JSON Schema"),
    ({"type": "xml"}, "must be 'text'"),
])
def test_bad_formats_are_400(client, bad, msg):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user("x"), response_format=bad, max_tokens=5)
    assert msg in e.value.message and e.value.body["param"] == "response_format"


def _valid_call(name, args):
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name]
    return errors(args, schema) == []


def test_named_tool_choice_openai(client):
    """Named tool_choice with thinking on: always that tool, always schema-valid arguments (12 calls), even when
    the logits push <tool_call> (id 8) hard while the model thinks, where no grammar applies yet."""
    for seed in range(12):
        r = client.chat.completions.create(model="tiny", messages=user("Weather in Paris?"), tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=300, seed=seed, temperature=1.0,
                                           logit_bias={"8": 50} if seed % 2 else None)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c.message
        fn = c.message.tool_calls[0].function
        assert fn.name == "get_weather" and _valid_call(fn.name, json.loads(fn.arguments)), fn


def test_required_and_no_tools(client):
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=user("Add 2 and 3"), tools=TOOLS,
                                           tool_choice="required", max_tokens=300, seed=seed, temperature=1.0,
                                           extra_body=OFF if seed % 2 else {})
        calls = r.choices[0].message.tool_calls
        assert calls and all(_valid_call(c.function.name, json.loads(c.function.arguments)) for c in calls)
    # no tools: the call tokens are banned, even when the logits push them hard
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=user("Weather?"), max_tokens=30, seed=seed,
                                           temperature=1.0, logit_bias={"8": 100, "9": 100})
        assert not r.choices[0].message.tool_calls and "tool_call>" not in (r.choices[0].message.content or "")


def test_named_tool_choice_anthropic(aclient):
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    for _ in range(10):
        r = aclient.messages.create(model="tiny", max_tokens=300, messages=user("Add 2 and 3"), tools=tools,
                                    tool_choice={"type": "tool", "name": "add"},
                                    thinking={"type": "enabled", "budget_tokens": 60})
        uses = [b for b in r.content if b.type == "tool_use"]
        assert r.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "add"
        assert _valid_call("add", uses[0].input), uses[0].input


def test_anthropic_output_format(aclient):
    for _ in range(3):
        r = aclient.messages.create(model="tiny", max_tokens=300, messages=user("Report"),
                                    extra_body={"output_format": {"type": "json_schema", "schema": NESTED}})
        text = "".join(b.text for b in r.content if b.type == "text")
        assert r.stop_reason == "end_turn" and errors(json.loads(text), NESTED) == [], text


def test_responses_text_format_and_named_tool(client):
    """The Responses API's `text.format` (json_schema fields at the top level) and named tool_choice go through the
    same grammars: every answer validates, every forced call is that tool with schema-valid arguments."""
    for seed in range(4):
        r = client.responses.create(model="tiny", input=f"Report {seed}", max_output_tokens=300, temperature=1.0,
                                    text={"format": {"type": "json_schema", "name": "report", "schema": NESTED}},
                                    reasoning={"effort": "none"} if seed % 2 else None)
        assert r.status == "completed" and errors(json.loads(r.output_text), NESTED) == [], r.output_text
    flat = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
            for t in TOOLS]
    for seed in range(4):
        r = client.responses.create(model="tiny", input="Weather in Paris?", tools=flat, max_output_tokens=300,
                                    tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0)
        calls = [o for o in r.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather", r.output
        assert _valid_call("get_weather", json.loads(calls[0].arguments))

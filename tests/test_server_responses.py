"""The Responses API through the official `openai` client (and its types, strictly), and an `openai-agents`
agent on its default `OpenAIResponsesModel`: text + reasoning, the streamed event sequence, function tools
(forced and not), `function_call_output` round trips (stored and stateless with encrypted reasoning),
`previous_response_id` chains, GET / DELETE, store eviction, errors."""
import base64
import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from engine_utils import one_thread  # noqa: F401
from server_utils import CHAT_WORDS, ScriptedEngine, live_server
from test_server_openai import SCRIPTS
from nemotron3.checkpoint import load
from nemotron3.server import create_app
from nemotron3.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city"]}}]
FORCE = {"type": "function", "name": "get_weather"}
EVENTS = TypeAdapter(ResponseStreamEvent)
STORE_SIZE = 3


@pytest.fixture(scope="module")
def server(server_model_dir):
    tok = load_tokenizer(server_model_dir)
    engine = ScriptedEngine(load(server_model_dir), tok, SCRIPTS, max_num_seqs=4, max_model_len=1024)
    with live_server(create_app(engine, served_model_name="tiny", responses_store_size=STORE_SIZE)) as url:
        yield url, engine, tok


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def raw(server, body: dict) -> httpx.Response:
    return httpx.post(server[0] + "/v1/responses", json={"model": "tiny", **body}, timeout=60)


def raw_events(server, body: dict) -> list:
    """The stream's events, each validated strictly against the SDK's event union (no unknown types)."""
    with httpx.stream("POST", server[0] + "/v1/responses", json={"model": "tiny", "stream": True, **body},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    names = [ln[7:] for ln in lines if ln.startswith("event: ")]
    datas = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: ")]
    assert names == [d["type"] for d in datas]
    return [EVENTS.validate_python(d) for d in datas]


def test_text_and_reasoning(client, server):
    r = client.responses.create(model="tiny", input="hi SCRIPT_HELLO")
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output_text == "Hello! How can I help you today?"
    assert r.output[0].content[0].text == "Let me think." and r.output[0].encrypted_content is None
    assert r.status == "completed" and r.id.startswith("resp_") and r.object == "response"
    n = len(server[2].encode(SCRIPTS["SCRIPT_HELLO"])) + 1
    assert r.usage.output_tokens == n and r.usage.total_tokens == r.usage.input_tokens + n
    assert r.usage.output_tokens_details.reasoning_tokens == len(server[2].encode("Let me think.\n"))
    # the raw body parses strictly as the SDK's Response; instructions and developer items are accepted
    body = raw(server, {"input": [{"type": "message", "role": "developer", "content": "Be brief."},
                                  {"role": "user", "content": [{"type": "input_text", "text": "SCRIPT_PLAIN"}]}],
                        "instructions": "You are terse.", "reasoning": {"effort": "none"}}).json()
    r = Response.model_validate(body, strict=True)
    assert [o.type for o in r.output] == ["message"] and r.output_text == "Plain answer."
    assert r.instructions == "You are terse." and r.usage.output_tokens_details.reasoning_tokens == 0


def test_stream_event_sequence(client, server):
    events = raw_events(server, {"input": "hi SCRIPT_HELLO", "include": ["reasoning.encrypted_content"]})
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.reasoning_text.delta"]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_item.done") == 2
    at = kinds.index("response.reasoning_text.done")
    assert kinds[at:at + 5] == ["response.reasoning_text.done", "response.content_part.done",
                                "response.output_item.done", "response.output_item.added",
                                "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == "Hello! How can I help you today?" and thought.strip() == "Let me think."
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens > 0 and final.status == "completed"
    assert json.loads(base64.b64decode(final.output[0].encrypted_content)) == {"nemotron3_reasoning": thought}
    assert client.responses.retrieve(final.id).output_text == text          # a stream is stored too
    # the SDK iterates the same stream as typed events, and its helper rebuilds the response
    sdk = list(client.responses.create(model="tiny", input="hi SCRIPT_HELLO", stream=True))
    assert [type(e).__name__ for e in sdk][-1] == "ResponseCompletedEvent"
    with client.responses.stream(model="tiny", input="hi SCRIPT_HELLO") as s:
        assert s.get_final_response().output_text == text


def test_function_tool_forced_and_round_trip(client, server):
    # SCRIPT_OK answers in text; a named tool_choice forces the call after the reasoning
    r = client.responses.create(model="tiny", input="SCRIPT_OK", tools=TOOLS, tool_choice=FORCE, max_output_tokens=40)
    assert [o.type for o in r.output][:2] == ["reasoning", "function_call"] and r.output[1].name == "get_weather"
    # (forced calls are grammar-constrained, which can bend a script; the scripted call itself comes with auto)
    r = client.responses.create(model="tiny", input="What is the weather? SCRIPT_WEATHER", tools=TOOLS)
    call = r.output[-1]
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris", "days": 3}
    Response.model_validate(client.responses.retrieve(r.id).model_dump(), strict=True)
    # stored round trip: the tool's output continues the stored conversation
    out = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"} SCRIPT_FINAL'}
    r2 = client.responses.create(model="tiny", previous_response_id=r.id, input=[out], tools=TOOLS)
    assert r2.output_text == "It is sunny in Paris." and r2.previous_response_id == r.id
    assert r2.usage.input_tokens > r.usage.input_tokens + 10
    # stateless round trip (Codex: store false, reasoning kept opaque): the same answer from items sent back
    r = client.responses.create(model="tiny", input="What is the weather? SCRIPT_WEATHER", tools=TOOLS, store=False,
                                include=["reasoning.encrypted_content"])
    assert r.output[0].encrypted_content
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    items = [o.model_dump(exclude_none=True) for o in r.output] + [{**out, "call_id": r.output[-1].call_id}]
    r3 = client.responses.create(model="tiny", input=[{"role": "user", "content": "What is the weather? SCRIPT_WEATHER"}]
                                 + items, tools=TOOLS, store=False)
    assert r3.output_text == "It is sunny in Paris." and r3.usage.input_tokens == r2.usage.input_tokens


def test_streamed_function_call(server):
    events = raw_events(server, {"input": "SCRIPT_WEATHER", "tools": TOOLS})
    kinds = [e.type for e in events]
    at = kinds.index("response.function_call_arguments.delta")
    assert kinds[at - 1] == "response.output_item.added" and events[at - 1].item.type == "function_call"
    assert kinds[at + 1:at + 3] == ["response.function_call_arguments.done", "response.output_item.done"]
    assert json.loads(events[at + 1].arguments) == {"city": "Paris", "days": 3}
    assert events[-1].response.output[-1].arguments == events[at + 1].arguments


def test_parallel_tool_calls(client):
    r = client.responses.create(model="tiny", input="SCRIPT_TWO", tools=TOOLS)
    assert [o.type for o in r.output] == ["reasoning", "message", "function_call", "function_call"]
    assert [json.loads(o.arguments)["city"] for o in r.output[2:]] == ["Paris", "Rome"]
    assert r.output[1].content[0].text == "Let me check." and r.output[2].call_id != r.output[3].call_id
    one = client.responses.create(model="tiny", input="SCRIPT_TWO", tools=TOOLS, parallel_tool_calls=False)
    assert [o.type for o in one.output].count("function_call") == 1 and one.parallel_tool_calls is False


def test_previous_response_chain(client, server):
    system = "You are a helpful assistant. " + CHAT_WORDS * 2           # > 2 prefix-cache blocks of 64 tokens
    first = client.responses.create(model="tiny", input="hi SCRIPT_HELLO", instructions=system)
    # the follow-up names no script itself: the scripted model answers from the stored context it sees
    second = client.responses.create(model="tiny", input="and again?", previous_response_id=first.id,
                                     instructions=system)
    assert second.output_text == first.output_text and first.usage.input_tokens > 128
    # the continuation's prompt starts with the first one's tokens: the prefix cache restores them (whole blocks)
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 64 * 64
    alone = client.responses.create(model="tiny", input="and again?", max_output_tokens=5)
    assert alone.output_text != first.output_text and alone.status == "incomplete"
    assert alone.incomplete_details.reason == "max_output_tokens" and alone.output[-1].status == "incomplete"
    events = raw_events(server, {"input": "and again?", "max_output_tokens": 5})
    assert events[-1].type == "response.incomplete" and events[-1].response.output[-1].status == "incomplete"
    assert events[-1].response.usage.output_tokens == 5


def test_get_delete_and_eviction(client):
    ids = [client.responses.create(model="tiny", input="SCRIPT_PLAIN", reasoning={"effort": "none"}).id
           for _ in range(STORE_SIZE + 1)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])                  # least recently used, evicted
    assert client.responses.retrieve(ids[-1]).output_text == "Plain answer."
    client.responses.delete(ids[-1])
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[-1])
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(ids[-1])


@pytest.mark.parametrize("body, status, param", [
    ({"input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": []}, 400, "input"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input[0].content"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0].type"),
    ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, 400, "input[0].role"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{nope"}]}, 400,
     "input[0].arguments"),
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-not-ours"}]}, 400, "input[0]"),
    ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "function", "name": "other"}}, 400, "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, 400, "tool_choice"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, 400, "reasoning.effort"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, 400, "text.format"),
    ({"input": "x", "max_output_tokens": 5000}, 400, "max_output_tokens"),
    ({"input": 5}, 400, "input"),
    ({"model": "other", "input": "x"}, 404, "model"),
])
def test_errors(server, body, status, param):
    r = raw(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err


def test_ignored_tool_types_and_sdk_errors(client):
    # Codex sends built-in and namespace tools; they are accepted and not offered to the model
    r = client.responses.create(model="tiny", input="SCRIPT_PLAIN", reasoning={"effort": "none"},
                                tools=TOOLS + [{"type": "web_search"}],
                                extra_body={"prompt_cache_key": "k", "client_metadata": {"a": "b"}})
    assert r.output_text == "Plain answer." and [t.type for t in r.tools] == ["function"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id="resp_missing")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input=[])


def test_agents_sdk_runner_with_a_function_tool(server):
    agents = pytest.importorskip("agents")
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        calls.append(city)
        return "sunny SCRIPT_FINAL"

    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused",
                                                        max_retries=0), use_for_tracing=False)
    agents.set_default_openai_api("responses")
    agent = agents.Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model="tiny",
                         model_settings=agents.ModelSettings(tool_choice="get_weather"))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris? SCRIPT_WEATHER", max_turns=4)
    assert calls == ["Paris"]                                  # the tool ran with the model's arguments
    kinds = [type(i).__name__ for i in result.new_items]
    assert "ToolCallItem" in kinds and "ToolCallOutputItem" in kinds and kinds[-1] == "MessageOutputItem"
    assert result.final_output == "It is sunny in Paris."

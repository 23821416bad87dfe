"""The Anthropic Messages API through the official `anthropic` client: text, thinking blocks, tool_use round
trip, streaming event sequence, stop reasons, count_tokens, errors."""
import anthropic
import httpx
import pytest

from engine_utils import one_thread  # noqa: F401
from server_utils import ScriptedEngine, live_server
from test_server_openai import SCRIPTS
from nemotron3.checkpoint import load
from nemotron3.server import create_app
from nemotron3.tokenizer import load_tokenizer

TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                           "required": ["city"]}}]
THINK = {"type": "enabled", "budget_tokens": 100}


@pytest.fixture(scope="module")
def server(server_model_dir):
    tok = load_tokenizer(server_model_dir)
    engine = ScriptedEngine(load(server_model_dir), tok, {**SCRIPTS, "SCRIPT_ANSWER": "The answer is 42."},
                            max_num_seqs=4, max_model_len=1024)
    with live_server(create_app(engine, served_model_name="tiny", api_key="secret")) as url:
        yield url, engine, tok


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server[0], api_key="secret", max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


def test_text_and_thinking(client, server):
    tok = server[2]
    r = client.messages.create(model="tiny", max_tokens=200, messages=user("SCRIPT_ANSWER"))
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == "The answer is 42."  # thinking off
    assert r.stop_reason == "end_turn" and r.stop_sequence is None and r.role == "assistant" and r.type == "message"
    assert r.usage.output_tokens == len(tok.encode("The answer is 42.")) + 1
    assert r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0) > 5
    r = client.messages.create(model="tiny", max_tokens=200, messages=user("SCRIPT_HELLO"), thinking=THINK,
                               system=[{"type": "text", "text": "You are a helpful assistant."}])
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == "Let me think." and r.content[1].text == "Hello! How can I help you today?"


def test_stream_events(client):
    events = list(client.messages.create(model="tiny", max_tokens=200, messages=user("SCRIPT_HELLO"),
                                         thinking=THINK, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]   # the SDK hides pings
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text"] and kinds.count("content_block_stop") == 2
    thinking = "".join(e.delta.thinking for e in events if e.type == "content_block_delta" and
                       e.delta.type == "thinking_delta")
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert thinking.strip() == "Let me think." and text == "Hello! How can I help you today?"
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens > 0
    # the SDK's accumulating helper rebuilds the same message
    with client.messages.stream(model="tiny", max_tokens=200, messages=user("SCRIPT_HELLO"), thinking=THINK) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[1].text == text


def test_raw_stream_has_ping_and_event_names(server):
    with httpx.stream("POST", server[0] + "/v1/messages", headers={"x-api-key": "secret"},
                      json={"model": "tiny", "max_tokens": 50, "stream": True, "messages": user("SCRIPT_ANSWER")}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[:3] == ["event: message_start", "event: ping", "event: content_block_start"]
    assert lines[-2:] == ["event: message_delta", "event: message_stop"]


def test_tool_use_round_trip(client):
    msgs = user("What is the weather in Paris? SCRIPT_WEATHER")
    r = client.messages.create(model="tiny", max_tokens=300, messages=msgs, tools=TOOLS, thinking=THINK)
    assert [b.type for b in r.content] == ["thinking", "tool_use"] and r.stop_reason == "tool_use"
    call = r.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris", "days": 3} and call.id.startswith("toolu_")
    with client.messages.stream(model="tiny", max_tokens=300, messages=msgs, tools=TOOLS, thinking=THINK) as s:
        events = list(s)
        final = s.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    assert final.content[1].input == {"city": "Paris", "days": 3} and final.stop_reason == "tool_use"
    msgs = msgs + [{"role": "assistant", "content": [b.model_dump() for b in r.content]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                 "content": [{"type": "text", "text": "sunny SCRIPT_FINAL"}]}]}]
    r2 = client.messages.create(model="tiny", max_tokens=300, messages=msgs, tools=TOOLS, thinking=THINK)
    assert [b.type for b in r2.content] == ["thinking", "text"] and r2.content[1].text == "It is sunny in Paris."
    assert r2.stop_reason == "end_turn"


def test_tool_choice_and_parallel(client):
    r = client.messages.create(model="tiny", max_tokens=300, messages=user("SCRIPT_TWO"), tools=TOOLS, thinking=THINK)
    assert [b.type for b in r.content] == ["thinking", "text", "tool_use", "tool_use"]
    r = client.messages.create(model="tiny", max_tokens=300, messages=user("SCRIPT_TWO"), tools=TOOLS, thinking=THINK,
                               tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.type for b in r.content] == ["thinking", "text", "tool_use"]
    r = client.messages.create(model="tiny", max_tokens=300, messages=user("SCRIPT_WEATHER"), tools=TOOLS,
                               thinking=THINK, tool_choice={"type": "none"})
    assert "tool_use" not in [b.type for b in r.content] and "tool_call>" not in r.content[-1].text   # banned


def test_sampling_fields(client):
    r = client.messages.create(model="tiny", max_tokens=8, messages=user("hello"),
                               extra_body={"temperature": 0.7, "top_p": 0.9, "top_k": 20})
    assert r.usage.output_tokens >= 1


def test_stop_reasons(client):
    r = client.messages.create(model="tiny", max_tokens=200, messages=user("SCRIPT_ANSWER"), stop_sequences=["is 4"])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "is 4" and r.content[0].text == "The answer "
    r = client.messages.create(model="tiny", max_tokens=3, messages=user("SCRIPT_ANSWER"))
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3


def test_count_tokens(client):
    n = client.messages.count_tokens(model="tiny", messages=user("SCRIPT_ANSWER")).input_tokens
    r = client.messages.create(model="tiny", max_tokens=5, messages=user("SCRIPT_ANSWER"))
    assert n == r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)


def test_errors(client, server):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-x", max_tokens=10, messages=user("hi"))
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny", max_tokens=10, messages=user("hi"), extra_body={"temperature": 1.5})
    assert e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny", max_tokens=50, messages=user("hi"),
                               thinking={"type": "enabled", "budget_tokens": 50})
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=server[0], api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=10, messages=user("hi"))
    assert e.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(server[0] + "/v1/messages", headers={"x-api-key": "secret"},
                   json={"model": "tiny", "messages": user("hi")})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("max_tokens")


def test_claude_code_request_shape(client, server):
    """What Claude Code sends: a `role: system` message inside `messages` (rendered as a system turn in place),
    cache_control on blocks, thinking adaptive + output_config.effort, context_management, metadata,
    `?beta=true`; and its `HEAD /` reachability probe."""
    tok = server[2]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>be nice</system-reminder>"},
                                         {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "Agents: none. SCRIPT_ANSWER"}]
    extra = dict(extra_query={"beta": "true"}, metadata={"user_id": '{"session": "x"}'},
                 extra_body={"context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}})
    system = [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]
    r = client.messages.create(model="tiny", max_tokens=100, messages=msgs, system=system, **extra)
    assert r.content[-1].text == "The answer is 42."           # the script key is only in the system message
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "You are Claude Code."},
         {"role": "user", "content": "<system-reminder>be nice</system-reminder>hi"},
         {"role": "system", "content": "Agents: none. SCRIPT_ANSWER"}],
        add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert "<|im_start|>system\nAgents: none." in expected
    count = client.messages.count_tokens(model="tiny", messages=msgs, system=system, extra_query={"beta": "true"})
    assert count.input_tokens == len(tok.encode(expected))
    # system content as text blocks; anything but text there is refused
    blocks = [{"role": "system", "content": [{"type": "text", "text": "SCRIPT_ANSWER"}]}, *user("hi")]
    assert client.messages.create(model="tiny", max_tokens=100, messages=blocks).content[-1].text == \
        "The answer is 42."
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny", max_tokens=10, messages=user("hi") + [
            {"role": "system", "content": [{"type": "image", "source": {}}]}])
    # effort maps like reasoning_effort: medium has a budget (~max_tokens // 2), high none (regular thinking)
    kw = dict(model="tiny", max_tokens=30, messages=user("tell me something"), thinking={"type": "adaptive"},
              extra_query={"beta": "true"})

    def effort(e):
        return {"extra_body": {**extra["extra_body"], "output_config": {"effort": e}, "temperature": 0}}

    medium = client.messages.create(**kw, **effort("medium"))     # greedy: the same reasoning, cut at the budget
    high = client.messages.create(**kw, **effort("max"))          # the random model never closes it by itself
    assert [b.type for b in high.content] == ["thinking"] and high.stop_reason == "max_tokens"
    assert medium.content[0].type == "thinking" and len(medium.content[0].thinking) < len(high.content[0].thinking)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(**kw, **effort("extreme"))
    head = httpx.head(server[0] + "/")
    assert head.status_code == 200 and head.content == b""
    assert httpx.get(server[0] + "/").text.lstrip().lower().startswith("<!doctype html")

"""The server through the official `openai` client: chat (stream and not), reasoning, tool calls end to end,
tool_choice, thinking modes and budgets, logprobs, n/seed, stop, completions, models, error types."""
import json

import openai
import pytest

from engine_utils import one_thread  # noqa: F401
from server_utils import ScriptedEngine, live_server
from nemotron3.checkpoint import load
from nemotron3.server import create_app
from nemotron3.tokenizer import load_tokenizer

CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n")
SCRIPTS = {
    "SCRIPT_HELLO": "Let me think.\n</think>\nHello! How can I help you today?",
    "SCRIPT_WEATHER": "The user asks about the weather, so I should call the tool.\n</think>\n" + CALL,
    "SCRIPT_FINAL": "The tool says sunny.\n</think>\nIt is sunny in Paris.",
    "SCRIPT_TWO": "Two cities.\n</think>\nLet me check.\n" + CALL + CALL.replace("Paris", "Rome"),
    "SCRIPT_PLAIN": "Plain answer.",
    "SCRIPT_OK": "Ok.\n</think>\nNo tool needed.",
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server(server_model_dir):
    tok = load_tokenizer(server_model_dir)
    engine = ScriptedEngine(load(server_model_dir), tok, SCRIPTS, max_num_seqs=4, max_model_len=1024)
    with live_server(create_app(engine, served_model_name="tiny")) as url:
        yield url, engine, tok


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").model_extra["max_model_len"] == 1024
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_chat_reasoning_and_content(client, server):
    tok = server[2]
    r = client.chat.completions.create(model="tiny", messages=user("hi SCRIPT_HELLO"))
    c = r.choices[0]
    assert c.message.content == "Hello! How can I help you today?"
    assert c.message.model_extra["reasoning_content"] == "Let me think."
    assert c.finish_reason == "stop" and c.message.role == "assistant" and not c.message.tool_calls
    n = len(tok.encode(SCRIPTS["SCRIPT_HELLO"])) + 1                # + the end-of-turn token
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n
    assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode("Let me think.\n"))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"


def test_chat_stream(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=user("hi SCRIPT_HELLO"), stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(ch.choices[0].delta.model_extra.get("reasoning_content") or "" for ch in chunks if ch.choices)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert reasoning.strip() == "Let me think." and content == "Hello! How can I help you today?"
    first_content = next(i for i, ch in enumerate(chunks) if ch.choices and ch.choices[0].delta.content)
    last_reasoning = max(i for i, ch in enumerate(chunks)
                         if ch.choices and ch.choices[0].delta.model_extra.get("reasoning_content"))
    assert last_reasoning < first_content                     # reasoning streams first, apart from content
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1 and all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_tool_call_round_trip(client):
    msgs = user("What is the weather in Paris? SCRIPT_WEATHER")
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert c.message.model_extra["reasoning_content"] == "The user asks about the weather, so I should call the tool."
    [call] = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}     # typed by the schema
    # the same call streamed: one tool-call delta with index, id, type, name and the JSON arguments
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].type == "function"
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == {"city": "Paris", "days": 3}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ""
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    # second turn: the assistant's call (with its reasoning) and the tool's result go back in
    msgs = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()],
                    "reasoning_content": c.message.model_extra["reasoning_content"]},
                   {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"} SCRIPT_FINAL'}]
    r2 = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS)
    assert r2.choices[0].message.content == "It is sunny in Paris." and r2.choices[0].finish_reason == "stop"
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_several_tool_calls_and_parallel_false(client):
    r = client.chat.completions.create(model="tiny", messages=user("SCRIPT_TWO"), tools=TOOLS)
    calls = r.choices[0].message.tool_calls
    assert [json.loads(t.function.arguments)["city"] for t in calls] == ["Paris", "Rome"]
    assert r.choices[0].message.content == "Let me check." and len({t.id for t in calls}) == 2
    chunks = list(client.chat.completions.create(model="tiny", messages=user("SCRIPT_TWO"), tools=TOOLS, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [d.index for d in deltas] == [0, 1]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Let me check."
    one = client.chat.completions.create(model="tiny", messages=user("SCRIPT_TWO"), tools=TOOLS,
                                         parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def _raw(choice):
    return "".join(t.token for t in choice.logprobs.content)


def test_tool_choice_forces_the_call(client):
    # named function, thinking on: the scripted model would answer in text; the call is forced after </think>
    r = client.chat.completions.create(model="tiny", messages=user("SCRIPT_OK"), tools=TOOLS, max_tokens=20,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       logprobs=True)
    raw = _raw(r.choices[0])
    assert raw.startswith("Ok.\n</think>\n<tool_call>\n<function=get_weather>\n"), raw   # the template's newline
    # required, thinking off: the answer's first tokens open a call
    r = client.chat.completions.create(model="tiny", messages=user("SCRIPT_PLAIN"), tools=TOOLS, max_tokens=12,
                                       tool_choice="required", logprobs=True,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert _raw(r.choices[0]).lstrip("\n").startswith("<tool_call>\n<function=")
    # none: tools are left out of the prompt, and the <tool_call> token is banned (the script's call cannot start)
    with_tools = client.chat.completions.create(model="tiny", messages=user("SCRIPT_WEATHER"), tools=TOOLS)
    none = client.chat.completions.create(model="tiny", messages=user("SCRIPT_WEATHER"), tools=TOOLS,
                                          tool_choice="none")
    assert not none.choices[0].message.tool_calls and "tool_call>" not in none.choices[0].message.content
    assert none.choices[0].finish_reason == "stop" and none.usage.prompt_tokens < with_tools.usage.prompt_tokens


def test_thinking_off_modes(client):
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        r = client.chat.completions.create(model="tiny", messages=user("SCRIPT_PLAIN"), extra_body=extra)
        assert r.choices[0].message.content == "Plain answer."
        assert r.choices[0].message.model_extra["reasoning_content"] is None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_thinking_budgets(client):
    # the random (unscripted) model never closes its reasoning by itself; the budget does (+10% grace)
    kw = dict(model="tiny", messages=user("tell me something"), max_tokens=30, temperature=0)
    r = client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"thinking_budget": 4},
                                                         "ignore_eos": True})
    assert r.usage.completion_tokens_details.reasoning_tokens in (4, 5)
    assert r.choices[0].message.model_extra["reasoning_content"] and r.usage.completion_tokens == 30
    r = client.chat.completions.create(**kw, extra_body={"thinking_budget": 6, "ignore_eos": True})
    assert r.usage.completion_tokens_details.reasoning_tokens in (6, 7)
    r = client.chat.completions.create(**kw, reasoning_effort="medium", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens_details.reasoning_tokens in (15, 16, 17)   # min(1024, max_tokens // 2)
    r = client.chat.completions.create(**kw, reasoning_effort="high", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens_details.reasoning_tokens >= 29            # regular: no budget


def test_logprobs(client, server):
    tok = server[2]
    r = client.chat.completions.create(model="tiny", messages=user("SCRIPT_HELLO"), logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in lp)
    assert _raw(r.choices[0]) == SCRIPTS["SCRIPT_HELLO"] + "</s>"             # the EOS token is an output token
    assert all(t.logprob > -1e-3 and t.top_logprobs[0].token == t.token for t in lp)     # the script wins by 60
    assert lp[0].bytes == list(lp[0].token.encode())
    chunks = list(client.chat.completions.create(model="tiny", messages=user("SCRIPT_HELLO"), logprobs=True,
                                                 top_logprobs=1, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in lp]
    assert len(tok.encode(SCRIPTS["SCRIPT_HELLO"])) + 1 == len(streamed)


def test_n_seed_and_stop(client):
    kw = dict(model="tiny", messages=user("random words please"), max_tokens=8, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 16
    assert [c.message.model_extra["reasoning_content"] for c in a.choices] == \
        [c.message.model_extra["reasoning_content"] for c in b.choices]
    chunks = list(client.chat.completions.create(n=2, stream=True, **kw))
    fins = sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    assert fins == [0, 1]
    for i, c in enumerate(a.choices):
        text = "".join(ch.choices[0].delta.model_extra.get("reasoning_content") or "" for ch in chunks
                       if ch.choices and ch.choices[0].index == i)
        assert text.strip("\n") == c.message.model_extra["reasoning_content"]
    r = client.chat.completions.create(model="tiny", messages=user("SCRIPT_HELLO"), stop=["How"])
    assert r.choices[0].message.content == "Hello! " and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == "How"
    r = client.chat.completions.create(model="tiny", messages=user("SCRIPT_HELLO"), max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_list_content_system_and_developer(client):
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "SCRIPT_HELLO"}]}]
    r = client.chat.completions.create(model="tiny", messages=msgs)
    assert r.choices[0].message.content == "Hello! How can I help you today?"


def test_completions(client, server):
    tok = server[2]
    r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 5 or r.choices[0].finish_reason == "stop"
    text = r.choices[0].text
    ids = tok.encode("def f(x):")
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert r2.choices[0].text == text and r2.usage.prompt_tokens == len(ids)
    stream = list(client.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == text
    assert stream[-1].usage.prompt_tokens == len(ids)
    batch = client.completions.create(model="tiny", prompt=["def f(x):", "import os"], max_tokens=4, temperature=0,
                                      n=2, logprobs=2, echo=False)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3] and batch.choices[0].text == batch.choices[1].text
    assert all(len(c.logprobs.tokens) == len(c.logprobs.top_logprobs) for c in batch.choices)
    assert batch.choices[0].text.startswith(text[:len(batch.choices[0].text)])
    echo = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0, echo=True)
    assert echo.choices[0].text == "def f(x):" + text


def test_penalties_and_logit_bias(client, server):
    """presence / frequency / repetition penalties and logit_bias reach the engine's SamplingParams."""
    tok = server[2]
    target = tok.encode(" zebra")[-1]
    r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=4, temperature=0,
                                  logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([target] * 4)
    kw = dict(model="tiny", messages=user("hi"), max_tokens=6, temperature=0, logprobs=True)
    first = client.chat.completions.create(**kw).choices[0].logprobs.content[0].token
    ban = tok.encode(first)[-1]
    other = client.chat.completions.create(**kw, logit_bias={str(ban): -100}, presence_penalty=1.5,
                                           frequency_penalty=0.5, extra_body={"repetition_penalty": 1.2})
    assert other.choices[0].logprobs.content[0].token != first


def test_error_types(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user("hi"), temperature=5)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=100000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=user("hi"), tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="", max_tokens=3)


def test_checkpoint_chat_template_is_used(server_model_dir, tmp_path):
    import asyncio
    import shutil

    import httpx
    from nemotron3.engine import LLM
    d = tmp_path / "model"
    shutil.copytree(server_model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = LLM(str(d), max_model_len=256)
    app = create_app(llm, served_model_name="custom")

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/chat/completions", json={"model": "custom", "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "hello"}]})
            await llm_shutdown(app)
            return r

    async def llm_shutdown(app):
        await app.state.server.engine.shutdown()

    r = asyncio.run(main())
    assert r.status_code == 200, r.text
    tok = llm.tokenizer
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("[user] hello\n[assistant] "))
    assert r.json()["choices"][0]["message"]["reasoning_content"] is None      # no <think> in this template

"""Reliability and security: every client mistake is a 4xx with the API's error body (never a 500 or a
hang), API keys, body size limit, admission limit (429), client disconnects abort, metrics, the chat page,
and a bounded load test (100 concurrent streams)."""
import asyncio
import json

import httpx
import pytest

from engine_utils import one_thread  # noqa: F401
from server_utils import live_server, wait_idle
from nemotron3.engine import LLMEngine
from nemotron3.checkpoint import load
from nemotron3.server import create_app
from nemotron3.tokenizer import load_tokenizer

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def make_engine(model_dir, **kw):
    return LLMEngine(load(model_dir), load_tokenizer(model_dir), **{"max_num_seqs": 16, "max_model_len": 512, **kw})


@pytest.fixture(scope="module")
def srv(server_model_dir):
    engine = make_engine(server_model_dir)
    with live_server(create_app(engine, served_model_name="tiny", max_body_bytes=50_000, max_n=4)) as url:
        yield url, engine


def chat(url, body, **kw):
    return httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, **body}, timeout=30, **kw)


def assert_openai_error(r, status, param=None, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


BAD_CHAT = [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),
    ({"n": 1.5}, "n"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"max_completion_tokens": 100000}, "max_completion_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stop": ""}, "stop"),
    ({"stop": ["x"] * 20}, "stop"),
    ({"stop": [1, 2]}, None),
    ({"stop_token_ids": [10 ** 6]}, "stop_token_ids"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"five": 1.0}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": "up"}}, "logit_bias.5"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"thinking_budget": -1}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": "on"}, "chat_template_kwargs"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": None,
                    "tool_calls": [{"id": "a", "type": "function",
                                    "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[0].tool_calls[0]"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": [TOOL, TOOL]}, "tools[1]"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"min_tokens": 10, "max_tokens": 2}, "min_tokens"),
    ({"max_tokens": True}, "max_tokens"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[json.dumps(b)[:60] for b, _ in BAD_CHAT])
def test_bad_chat_requests_are_400(srv, body, param):
    assert_openai_error(chat(srv[0], body), 400, param)


def test_malformed_bodies(srv):
    url = srv[0] + "/v1/chat/completions"
    for content in (b"{not json", b"", b"[1, 2]", b'"text"', b"null"):
        r = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert_openai_error(r, 400)
    assert "JSON" in httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}).json()["error"]["message"]


def test_null_means_default_and_integral_floats_are_ints(srv):
    """OpenAI's and vLLM's schemas make these fields nullable (null = not given); JSON does not tell 3.0
    from 3 (JavaScript cannot even write 3.0)."""
    url = srv[0]
    for body in ({"stream": None}, {"n": None}, {"logprobs": None}, {"parallel_tool_calls": None},
                 {"ignore_eos": None, "min_tokens": None, "skip_special_tokens": None}, {"max_tokens": 3.0},
                 {"max_completion_tokens": 3.0, "n": 2.0, "seed": 7.0}, {"logprobs": True, "top_logprobs": 2.0},
                 {"chat_template_kwargs": {"thinking_budget": 8.0}}):
        r = chat(url, {"max_tokens": 3, **body})
        assert r.status_code == 200, (body, r.text)
        if body.get("top_logprobs"):
            assert all(len(t["top_logprobs"]) == 2 for t in r.json()["choices"][0]["logprobs"]["content"])
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [20.0, 21.0], "max_tokens": 2.0,
                                                 "echo": None, "logprobs": 1.0, "stream": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    r = httpx.post(url + "/v1/messages", json={"model": "tiny", "max_tokens": 2.0, "messages": MSG, "stream": None,
                                              "system": None, "top_k": None})
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] <= 2, r.text
    assert_openai_error(chat(url, {"max_tokens": 2.5}), 400, "max_tokens")
    assert_openai_error(chat(url, {"model": None}), 400, "model")             # required: null is missing


def test_lone_surrogates_and_undecodable_bodies(srv):
    """A JSON `\\ud83d` escape without its pair (text cut mid-emoji) used to crash the tokenizer (500);
    invalid UTF-8 and deep nesting got a vague message. Any Content-Type is read as JSON."""
    url = srv[0]
    h = {"content-type": "application/json"}
    cases = [("/v1/chat/completions", b'{"model":"tiny","max_tokens":2,"messages":[{"role":"user","content":"a\\ud83d"}]}', 200),
             ("/v1/completions", b'{"model":"tiny","max_tokens":2,"prompt":"\\udfff"}', 200),
             ("/v1/messages", b'{"model":"tiny","max_tokens":2,"messages":[{"role":"user","content":"\\ud800"}]}', 200),
             ("/v1/chat/completions", b'{"model":"\\ud800","messages":[{"role":"user","content":"x"}]}', 404),
             ("/v1/chat/completions", b'{"model":"tiny","max_tokens":2,"messages":[{"role":"user","content":"\\ud83d\\ude00"}]}', 200)]
    for path, raw, status in cases:
        r = httpx.post(url + path, content=raw, headers=h)
        assert r.status_code == status, (raw, r.text)
    err = assert_openai_error(httpx.post(url + "/v1/chat/completions", content=b'{"model": "\xff"}', headers=h), 400)
    assert "UTF-8" in err["message"]
    deep = b'{"model": "tiny", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    err = assert_openai_error(httpx.post(url + "/v1/chat/completions", content=deep, headers=h), 400)
    assert "nested" in err["message"]
    good = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 2}).encode()
    for ct in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        assert httpx.post(url + "/v1/chat/completions", content=good, headers=ct).status_code == 200, ct
    assert chat(url, {"max_tokens": 2}).status_code == 200


def test_disconnect_that_moves_a_grown_cache_slot(srv):
    """A client leaving frees its slot and moves the highest decoding sequence into it; once a long prompt
    had regrown the K/V buffers (inside the engine's inference mode) that copy raised outside it, which
    failed every open request and every later one (500s until restart)."""
    url, engine = srv
    short = {"model": "tiny", "prompt": [20] * 5, "max_tokens": 300, "ignore_eos": True, "stream": True}
    long = {"model": "tiny", "prompt": [21] * 300, "max_tokens": 40, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as ca, httpx.Client(timeout=30) as cb:
        ra = ca.send(ca.build_request("POST", url + "/v1/completions", json=short), stream=True)
        lines_a = ra.iter_lines()
        next(lines_a)                                         # slot 0, decoding
        rb = cb.send(cb.build_request("POST", url + "/v1/completions", json=long), stream=True)
        lines_b = rb.iter_lines()
        next(lines_b)                                         # slot 1, decoding, K/V buffers regrown
        ra.close()                                            # leave: slot 1 is moved into slot 0
        rest = [line for line in lines_b if line]
        rb.close()
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest), rest[-3:]
    assert wait_idle(engine)
    assert chat(url, {"max_tokens": 2}).status_code == 200


def test_unknown_model_route_method(srv):
    assert_openai_error(chat(srv[0], {"model": "gpt-4o"}), 404, "model", "model_not_found")
    assert_openai_error(httpx.get(srv[0] + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(srv[0] + "/v1/chat/completions"), 405)


def test_prompt_too_long(srv):
    long = [{"role": "user", "content": "word " * 2000}]
    err = assert_openai_error(chat(srv[0], {"messages": long}), 400, code="context_length_exceeded")
    assert "512" in err["message"]
    r = httpx.post(srv[0] + "/v1/completions", json={"model": "tiny", "prompt": [20] * 600, "max_tokens": 1})
    assert_openai_error(r, 400, code="context_length_exceeded")


BAD_COMPLETIONS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [5, 10 ** 6]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": 5}, None),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "max_tokens": 10 ** 6}, "max_tokens"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[json.dumps(b)[:40] for b, _ in BAD_COMPLETIONS])
def test_bad_completion_requests_are_400(srv, body, param):
    r = httpx.post(srv[0] + "/v1/completions", json={"model": "tiny", **body})
    assert_openai_error(r, 400, param)


BAD_MESSAGES = [
    {"messages": MSG},                                                       # max_tokens is required
    {"max_tokens": 0, "messages": MSG},
    {"max_tokens": 10, "messages": []},
    {"max_tokens": 10, "messages": [{"role": "system", "content": "x"}]},
    {"max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"max_tokens": 10, "messages": MSG, "temperature": 1.5},
    {"max_tokens": 10, "messages": MSG, "thinking": {"type": "enabled", "budget_tokens": 10}},
    {"max_tokens": 10, "messages": MSG, "thinking": {"type": "sometimes"}},
    {"max_tokens": 10, "messages": MSG, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    {"max_tokens": 10, "messages": MSG, "tools": [{"name": "f", "input_schema": {"type": "object"}}],
     "tool_choice": {"type": "tool", "name": "g"}},
    {"max_tokens": 10, "messages": MSG, "tool_choice": {"type": "any"}},
    {"max_tokens": 10 ** 6, "messages": MSG},
    {"max_tokens": 10, "messages": MSG, "stop_sequences": [""]},
]


@pytest.mark.parametrize("body", BAD_MESSAGES, ids=[json.dumps(b)[:60] for b in BAD_MESSAGES])
def test_bad_messages_requests_are_anthropic_400(srv, body):
    r = httpx.post(srv[0] + "/v1/messages", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    j = r.json()
    assert j["type"] == "error" and j["error"]["type"] == "invalid_request_error" and j["error"]["message"]
    r = httpx.post(srv[0] + "/v1/messages", json={"model": "claude", "max_tokens": 5, "messages": MSG})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(srv[0] + "/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error"


def test_body_size_limit(srv):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 60_000}]}
    assert_openai_error(httpx.post(srv[0] + "/v1/chat/completions", json=big), 413, code="request_too_large")

    def chunked():                                         # no Content-Length: counted while read
        yield json.dumps(big).encode()

    assert_openai_error(httpx.post(srv[0] + "/v1/chat/completions", content=chunked(),
                                   headers={"content-type": "application/json"}), 413)
    r = httpx.post(srv[0] + "/v1/messages", json={**big, "max_tokens": 5})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_chunked_small_body_works(srv):
    def chunked():
        yield b'{"model": "tiny", "max_tokens": 2, '
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    r = httpx.post(srv[0] + "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_api_key(server_model_dir):
    app = create_app(make_engine(server_model_dir), served_model_name="tiny", api_key="k3y")
    with live_server(app) as url:
        for h in ({}, {"Authorization": "Bearer nope"}, {"x-api-key": "nope"}, {"Authorization": "k3y"}):
            err = assert_openai_error(httpx.get(url + "/v1/models", headers=h), 401)
            assert err["type"] == "authentication_error"
        assert_openai_error(chat(url, {}), 401)
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"x-api-key": "k3y"}).status_code == 200
        r = chat(url, {"max_tokens": 2}, headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200
        r = httpx.post(url + "/v1/messages", json={"model": "tiny", "max_tokens": 5, "messages": MSG})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_admission_limit_429(server_model_dir):
    engine = make_engine(server_model_dir)
    with live_server(create_app(engine, served_model_name="tiny", max_pending=1)) as url:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)                                   # the stream is running
            second = chat(url, {"max_tokens": 2})
            assert_openai_error(second, 429)
            assert second.headers["retry-after"] == "1"
        assert wait_idle(engine)
        assert chat(url, {"max_tokens": 2}).status_code == 200


def aborts(url) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for f in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in f.samples:
            if s.name == "nemotron3_request_success_total" and s.labels.get("finished_reason") == "abort":
                return s.value
    return 0.0


def test_stream_disconnect_aborts(srv):
    url, engine = srv
    body = {"model": "tiny", "messages": MSG, "max_tokens": 450, "stream": True, "ignore_eos": True}
    before, aborted = engine.stats.decode_tokens, aborts(url)
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data:")
            if got == 5:
                break                                     # leave mid-stream: the connection closes
    assert wait_idle(engine), "the engine kept generating for a client that left"
    assert engine.stats.decode_tokens - before < 400 and aborts(url) == aborted + 1
    assert sorted(engine.scheduler.free_slots) == list(range(engine.max_num_seqs))


def test_non_stream_disconnect_aborts(srv):
    """A non-streaming client that hangs up mid-generation aborts its request. The socket closes only once
    the engine is decoding for it (a fixed client timeout could fire before the request is admitted on a
    loaded machine, and then there is nothing to abort)."""
    import socket
    import time
    from urllib.parse import urlparse
    url, engine = srv
    body = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 450, "ignore_eos": True}).encode()
    before, aborted = engine.stats.decode_tokens, aborts(url)
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    t = time.time()
    while engine.stats.decode_tokens - before < 5 and time.time() - t < 20:
        time.sleep(0.005)
    sock.close()
    assert engine.stats.decode_tokens - before >= 5, "the request never started decoding"
    assert wait_idle(engine), "the engine kept generating for a client that left"
    assert engine.stats.decode_tokens - before < 400 and aborts(url) == aborted + 1
    assert sorted(engine.scheduler.free_slots) == list(range(engine.max_num_seqs))


def test_load_100_concurrent_streams(srv):
    url, engine = srv
    N, T = 100, 6

    async def one(client, i):
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": T,
                "stream": True, "ignore_eos": True, "logprobs": True, "temperature": 1.0, "seed": i,
                "stream_options": {"include_usage": True}}
        tokens, usage, done = 0, None, False
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                ch = json.loads(line[6:])
                assert "error" not in ch, ch
                for c in ch["choices"]:
                    tokens += len((c.get("logprobs") or {}).get("content") or [])
                usage = ch.get("usage") or usage
        return done, tokens, usage

    async def main():
        limits = httpx.Limits(max_connections=N)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(N)))

    res = asyncio.run(main())
    assert len(res) == N and all(done for done, _, _ in res)
    assert all(tokens == T == u["completion_tokens"] for _, tokens, u in res)
    assert wait_idle(engine)


class FailingEngine(LLMEngine):
    """Raises inside an engine step while `fail` is set (a model bug, an OOM...)."""
    fail = False

    def step(self):
        if self.fail:
            raise RuntimeError("secret internal detail")
        return super().step()


def test_engine_failure_is_a_clean_500_and_the_server_recovers(server_model_dir):
    engine = FailingEngine(load(server_model_dir), load_tokenizer(server_model_dir), max_num_seqs=2, max_model_len=512)
    with live_server(create_app(engine, served_model_name="tiny")) as url:
        engine.fail = True
        err = assert_openai_error(chat(url, {"max_tokens": 3}), 500)
        assert err["type"] == "server_error" and "secret" not in err["message"]
        with httpx.stream("POST", url + "/v1/chat/completions",
                          json={"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["type"] == "server_error" and "secret" not in "".join(lines)
        r = httpx.post(url + "/v1/messages", json={"model": "tiny", "max_tokens": 3, "messages": MSG})
        assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
        engine.fail = False
        assert chat(url, {"max_tokens": 3}).status_code == 200


def test_metrics_parse(srv):
    from prometheus_client.parser import text_string_to_metric_families
    url = srv[0]
    chat(url, {"max_tokens": 3})
    chat(url, {"temperature": -1})
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("nemotron3_requests", "nemotron3_prompt_tokens", "nemotron3_generation_tokens",
                 "nemotron3_time_to_first_token_seconds", "nemotron3_inter_token_latency_seconds",
                 "nemotron3_num_requests_running", "nemotron3_num_requests_waiting", "nemotron3_cache_usage_perc",
                 "nemotron3_spec_decode_num_accepted_tokens", "nemotron3_spec_decode_num_draft_tokens",
                 "nemotron3_e2e_request_latency_seconds", "nemotron3_request_errors"):
        assert name in fams, name
    assert fams["nemotron3_time_to_first_token_seconds"].type == "histogram"
    value = {s.name: s.value for f in fams.values() for s in f.samples if not s.labels.get("le")}
    assert value["nemotron3_generation_tokens_total"] >= 3 and value["nemotron3_prompt_tokens_total"] > 0
    assert value["nemotron3_time_to_first_token_seconds_count"] >= 1
    errors = {s.labels.get("status"): s.value for s in fams["nemotron3_request_errors"].samples}
    assert "500" not in errors and errors.get("400", 0) > 0      # many 400s above, never a 500


def test_chat_page(srv):
    r = httpx.get(srv[0] + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for needle in ('id="thinking"', 'id="budget"', 'id="temperature"', 'id="messages"', 'id="input"', 'id="send"',
                   'id="stop"', '"details"', "reasoning_content", "tool_calls", "getReader", "/v1/chat/completions",
                   "thinking_budget", "enable_thinking"):
        assert needle in page, needle
    assert "<script src" not in page and "<link" not in page            # no external dependencies
    assert "access-control-allow-origin" not in r.headers
    assert httpx.get(srv[0] + "/health").json() == {"status": "ok"}


def test_metrics_registries_are_per_app(server_model_dir):
    """Two apps in one process (same model name) keep separate metrics: prometheus_client's global registry
    would refuse the second app's metric names."""
    engine = make_engine(server_model_dir)
    a, b = create_app(engine, "tiny"), create_app(engine, "tiny")
    a.state.server.metrics.error(400)
    ra, rb = a.state.server.metrics.render().decode(), b.state.server.metrics.render().decode()
    assert 'nemotron3_request_errors_total{model_name="tiny",status="400"} 1.0' in ra
    assert "status=" not in rb and "nemotron3_num_requests_running" in rb

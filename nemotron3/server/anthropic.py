"""The Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) on the same engine and
chat template as the OpenAI routes.

Mapping (design decisions):

* `system` (string or text blocks) becomes the system message; user `tool_result` blocks become `tool`
  messages (in order, before the user's text), assistant `thinking` blocks become `reasoning_content`,
  `tool_use` blocks become `tool_calls`. Images and documents are refused (400): the model reads text only.
* Thinking is **off unless requested**, as in Anthropic's API: `thinking: {type: enabled, budget_tokens}`
  turns it on with that budget (it must be below `max_tokens`), `{type: adaptive}` turns it on without a
  budget. `output_config.effort` (low / medium / high / max) then maps onto the engine's modes exactly as
  OpenAI's `reasoning_effort` does (max = high). Reasoning comes back as `thinking` blocks with an empty
  `signature` (there is nothing to sign).
* **As Claude Code sends it**: `role: "system"` messages inside `messages` are system turns in place (the chat
  template renders a mid-conversation system turn); `context_management`, `metadata`, `cache_control` on
  blocks and the `?beta=true` query are accepted and have no effect here.
* `tool_choice` `any` / `tool` steer like OpenAI's `required` / named function (see serving.py); `none` leaves
  the tools out; `disable_parallel_tool_use` keeps the first call. Only custom tools (name, description,
  input_schema, `strict`) exist here; server tools (`web_search_...`) are refused.
* `output_format` `{type: json_schema, schema}` (structured outputs): the text answer follows the schema
  (grammar-constrained decoding, serving.py).
* `usage.input_tokens` counts the prompt tokens that were computed; `cache_read_input_tokens` those restored
  from the prefix cache (Anthropic's accounting: the two add up to the prompt). For that reason a stream's
  `message_start` is sent with the first engine output, when the cached count is known, followed by a
  `ping`.
* `stop_reason`: `end_turn` (end of turn token), `max_tokens`, `stop_sequence` (with `stop_sequence`),
  `tool_use` (a tool call was parsed).
"""
from __future__ import annotations

import json
import logging
import uuid
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..chat.parsers import StreamParser, parse_output
from . import protocol
from .http import SSE_HEADERS, until_disconnect
from .openai import thinking_settings
from .protocol import APIError
from .serving import ChatPlan, ChatStreamState, Server, answer_mode, with_system_note

log = logging.getLogger("nemotron3.server")
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high"}     # onto reasoning_effort's scale


def _event(name: str, obj) -> str:
    return f"event: {name}\ndata: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id[len("call_"):] if call_id.startswith("call_") else call_id


def _text_of(content, where: str, what: str = "tool results") -> str:
    """Text of a tool_result's (or system message's) content (a string or a list of text blocks)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, b in enumerate(content):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise APIError(400, f"{where}.content[{j}]: only text blocks are supported in {what}")
        parts.append(b["text"])
    return "\n".join(parts)


def _system_text(system) -> str | None:
    if system is None:
        return None
    return system if isinstance(system, str) else "\n".join(b.text for b in system)


def convert_messages(req) -> list[dict]:
    if not req.messages:
        raise APIError(400, "messages: at least one message is required")
    out: list[dict] = []
    system = _system_text(req.system)
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        if m.role not in ("user", "assistant", "system"):
            raise APIError(400, f"{where}.role: must be 'user', 'assistant' or 'system' (got {m.role!r})")
        if m.role == "system":                  # Claude Code: a system turn in place (agent and skill lists)
            out.append({"role": "system", "content": m.content if isinstance(m.content, str) else
                        _text_of([b.model_dump(exclude_none=True) for b in m.content], where,
                                 "system messages")})
            continue
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, reasoning, calls = [], [], []
        for j, b in enumerate(m.content):
            w = f"{where}.content.{j}"
            if b.type == "text":
                if b.text is None:
                    raise APIError(400, f"{w}.text: field required")
                text.append(b.text)
            elif b.type == "tool_result" and m.role == "user":
                if not b.tool_use_id:
                    raise APIError(400, f"{w}.tool_use_id: field required")
                body = _text_of(b.content, w)
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": f"Error: {body}" if b.is_error else body})
            elif b.type == "tool_use" and m.role == "assistant":
                if not b.name or b.id is None:
                    raise APIError(400, f"{w}: tool_use blocks need an id and a name")
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": b.input or {}}})
            elif b.type == "thinking" and m.role == "assistant":
                reasoning.append(b.thinking or "")
            elif b.type == "redacted_thinking" and m.role == "assistant":
                continue
            else:
                raise APIError(400, f"{w}.type: {b.type!r} blocks are not supported in {m.role} messages "
                                    "(this server reads text, tool_use, tool_result and thinking blocks)")
        if m.role == "assistant":
            msg = {"role": "assistant", "content": "".join(text)}
            if reasoning:
                msg["reasoning_content"] = "\n".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif text:
            out.append({"role": "user", "content": "".join(text)})
    if not any(m["role"] != "system" for m in out):
        raise APIError(400, "messages: at least one user or assistant message is required")
    return out


def convert_tools(server: Server, req) -> tuple[list[dict] | None, str | None, str | None, bool]:
    """(OpenAI-style tools for the template, forced tool name, system note, parse tools)."""
    tools = None
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.type not in (None, "custom"):
                raise APIError(400, f"tools.{i}.type: server tools ({t.type!r}) are not supported; only custom "
                                    "tools with an input_schema")
            fn = {"name": t.name, "parameters": t.input_schema if t.input_schema is not None else
                  {"type": "object", "properties": {}}}
            if t.description:
                fn["description"] = t.description
            if t.strict is not None:
                fn["strict"] = t.strict
            tools.append({"type": "function", "function": fn})
        server.check_tools(tools, "tools")
    choice = req.tool_choice
    kind = choice.type if choice else "auto"
    names = [t["function"]["name"] for t in tools or []]
    if kind in ("any", "tool") and not tools:
        raise APIError(400, f"tool_choice.type {kind!r} needs tools")
    if kind == "tool":
        if not choice.name or choice.name not in names:
            raise APIError(400, f"tool_choice.name: {choice.name!r} is not one of the tools")
        return tools, choice.name, f"You must call the function `{choice.name}` now.", True
    if kind == "any":
        return tools, None, "You must call at least one of the functions listed above.", True
    if kind == "none":
        return None, None, None, False
    return tools, None, None, bool(tools)


def plan_messages(server: Server, req, *, count_only=False):
    messages = convert_messages(req)
    tools, forced, note, parse_tools = convert_tools(server, req)
    if note:
        messages = with_system_note(messages, note)
    th = req.thinking
    kwargs, mode, budget = {}, "off", None
    if th is not None and th.type in ("enabled", "adaptive"):
        mode = "regular"
        budget = th.budget_tokens if th.type == "enabled" else None
        if not count_only and budget is not None and budget >= req.max_tokens:
            raise APIError(400, f"thinking.budget_tokens ({budget}) must be less than max_tokens ({req.max_tokens})")
        effort = req.output_config.effort if req.output_config else None
        if effort is not None:
            if effort not in EFFORTS:
                raise APIError(400, f"output_config.effort: must be one of {', '.join(EFFORTS)} (got {effort!r})")
            mode, budget = thinking_settings(server, EFFORTS[effort], kwargs, budget, "output_config")
    else:
        kwargs["enable_thinking"] = False
    text, ids = server.render(messages, tools if parse_tools else None, kwargs)
    if count_only:
        return ids
    parallel = not (req.tool_choice and req.tool_choice.disable_parallel_tool_use)
    fmt = req.output_format.model_dump(by_alias=True, exclude_none=True) if req.output_format else None
    fields = server.constraints(tools, forced, bool(note) and not forced, parse_tools, parallel,
                                server.structured(fmt, "output_format"))
    params = server.params(
        n=1, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, max_tokens=req.max_tokens,
        stop=server.check_stop(req.stop_sequences, "stop_sequences"), skip_special_tokens=False,
        reasoning_mode=answer_mode(mode, budget, fields), thinking_budget=budget, **fields)
    names = {"structured_outputs": "output_format" if req.output_format else "tools"}
    return ChatPlan(ids, server.check_request(ids, params, names), thinking=text.rfind("<think>") > text.rfind("</think>"),
                    tools=tools, parse_tools=parse_tools,
                    parallel=parallel)


def _stop(c, has_calls: bool, stops: list[str]) -> tuple[str, str | None]:
    if c.finish_reason == "length":
        return "max_tokens", None
    if has_calls:
        return "tool_use", None
    if isinstance(c.stop_reason, str) and c.stop_reason in stops:
        return "stop_sequence", c.stop_reason
    return "end_turn", None


def _usage(final, output_tokens: int) -> dict:
    cached = final.metrics.num_cached_tokens
    return {"input_tokens": len(final.prompt_token_ids) - cached, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def message_response(final, plan: ChatPlan, mid: str, model: str, stops: list[str]) -> dict:
    c = final.outputs[0]
    d = parse_output(c.text, plan.thinking, plan.tools, plan.parse_tools)
    calls = d.tool_calls if plan.parallel else d.tool_calls[:1]
    content = []
    if d.reasoning:
        content.append({"type": "thinking", "thinking": d.reasoning, "signature": ""})
    if d.content:
        content.append({"type": "text", "text": d.content})
    for tc in calls:
        content.append({"type": "tool_use", "id": _tool_id(tc.id), "name": tc.name, "input": tc.arguments})
    reason, seq = _stop(c, bool(calls), stops)
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": seq, "usage": _usage(final, len(c.token_ids))}


async def message_stream(server: Server, plan: ChatPlan, mid: str, model: str, stops: list[str]):
    st = ChatStreamState(StreamParser(plan.thinking, plan.tools, plan.parse_tools), plan.parallel)
    idx, open_type, started = -1, None, False
    events: list[str] = []

    def start(kind, block):
        nonlocal idx, open_type
        close()
        idx += 1
        open_type = kind
        events.append(_event("content_block_start", {"type": "content_block_start", "index": idx,
                                                     "content_block": block}))

    def close():
        nonlocal open_type
        if open_type is not None:
            events.append(_event("content_block_stop", {"type": "content_block_stop", "index": idx}))
            open_type = None

    def delta(d):
        events.append(_event("content_block_delta", {"type": "content_block_delta", "index": idx, "delta": d}))

    try:
        async with aclosing(server.run(plan.ids, plan.params, "messages")) as gen:
            async for out in gen:
                c = out.outputs[0]
                if not started:
                    started = True
                    u = _usage(out, 0)
                    yield _event("message_start", {"type": "message_start", "message": {
                        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                        "stop_reason": None, "stop_sequence": None, "usage": u}})
                    yield _event("ping", {"type": "ping"})
                d = st.parser.feed(c.delta_text)
                if c.finished:
                    d += st.parser.finish()
                for piece in st.deltas(d):
                    if "reasoning_content" in piece:
                        if open_type != "thinking":
                            start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                        delta({"type": "thinking_delta", "thinking": piece["reasoning_content"]})
                    elif "content" in piece:
                        if open_type != "text":
                            start("text", {"type": "text", "text": ""})
                        delta({"type": "text_delta", "text": piece["content"]})
                    else:
                        fn = piece["tool_calls"][0]
                        start("tool_use", {"type": "tool_use", "id": _tool_id(fn["id"]),
                                           "name": fn["function"]["name"], "input": {}})
                        delta({"type": "input_json_delta", "partial_json": fn["function"]["arguments"]})
                        close()
                for e in events:
                    yield e
                events.clear()
                if c.finished:
                    close()
                    for e in events:
                        yield e
                    events.clear()
                    reason, seq = _stop(c, st.n_calls > 0, stops)
                    yield _event("message_delta", {"type": "message_delta",
                                                   "delta": {"stop_reason": reason, "stop_sequence": seq},
                                                   "usage": {"output_tokens": len(c.token_ids)}})
                    yield _event("message_stop", {"type": "message_stop"})
    except APIError as e:
        yield _event("error", protocol.anthropic_error(e.status, e.message))
    except Exception:
        log.exception("messages stream failed")
        yield _event("error", protocol.anthropic_error(500, "internal server error"))


def add_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/messages")
    async def messages(req: protocol.MessagesRequest, request: Request):
        server.check_model(req.model)
        plan = await server.offload(plan_messages, server, req)
        server.admit(1)
        mid = f"msg_{uuid.uuid4().hex}"
        stops = plan.params.stop
        if req.stream:
            return StreamingResponse(message_stream(server, plan, mid, req.model, stops),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        final = await until_disconnect(request, server.final(plan.ids, plan.params, "messages"))
        if final is None:
            return Response(status_code=499)
        return JSONResponse(protocol.MessagesResponse.model_validate(
            message_response(final, plan, mid, req.model, stops)).model_dump())

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(req: protocol.CountTokensRequest):
        server.check_model(req.model)
        ids = await server.offload(plan_messages, server, req, count_only=True)
        return {"input_tokens": len(ids)}

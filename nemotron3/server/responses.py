"""The OpenAI Responses API: `POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`, on the same serving core
as chat completions (a Responses request becomes chat messages, then a `ChatPlan`).

Design decisions:

* **Input items -> chat messages.** `message` items (user / assistant / system / developer, text parts) become
  chat turns in place (developer = system); `reasoning` items attach their text to the next assistant turn;
  `function_call` items become the assistant's `tool_calls` (consecutive ones share one turn);
  `function_call_output` items become `tool` messages. `instructions` is the system message of this request
  only (as OpenAI: it is not carried over by `previous_response_id`).
* **Tools.** Function tools (Responses' flat shape) are offered to the model; other tool types (`web_search`,
  `namespace`, `local_shell`, ...) are accepted and ignored, as vLLM does with built-in tools it does not host:
  Codex CLI sends them with every request. `tool_choice` auto / none / required / `{type: function, name}`
  steer as in chat (serving.py).
* **Reasoning** comes back as a `reasoning` item whose `content` holds the text (`reasoning_text`) and whose
  `summary` is empty (there is no summariser). With `include: ["reasoning.encrypted_content"]` the text is also
  put in `encrypted_content` as base64 of JSON: opaque to clients, NOT encrypted. Such items are accepted back
  as input, so reasoning round-trips through clients that keep state themselves (`store: false`).
* **Store.** `store: true` (the default) keeps the response and its conversation in a bounded in-memory LRU
  (`serve --responses-store-size`); `previous_response_id` renders the stored conversation + the new input.
  Earlier turns keep their reasoning (`truncate_history_thinking=False`: reasoning items in the input are
  context, as in OpenAI's API; a client that wants them gone leaves them out), so a continuation's prompt
  begins with exactly the previous prompt + output tokens, which the prefix cache restores.
* **Streaming** follows OpenAI's event sequence (`response.created`, `response.in_progress`, per item
  `output_item.added` / `content_part.added` / deltas / `.done`, then `response.completed`, or
  `response.incomplete` when `max_output_tokens` cut it), every event with a `sequence_number`; an error after
  the stream started becomes an `error` event. Nothing is stored for a stream the client left.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from collections import OrderedDict
from contextlib import aclosing
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..chat.parsers import StreamParser, parse_output
from .http import SSE_HEADERS, until_disconnect
from .openai import EFFORT, thinking_settings
from .protocol import APIError
from .protocol_responses import ResponsesRequest
from .serving import ChatPlan, ChatStreamState, Server, answer_mode, with_system_note

log = logging.getLogger("nemotron3.server")

ENCRYPTED = "reasoning.encrypted_content"
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def seal(reasoning: str) -> str:
    """The reasoning text as an opaque `encrypted_content` string (base64 of JSON; not encrypted)."""
    return base64.b64encode(json.dumps({"nemotron3_reasoning": reasoning}).encode()).decode()


def unseal(blob: str, where: str) -> str:
    try:
        return json.loads(base64.b64decode(blob, validate=True))["nemotron3_reasoning"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise APIError(400, f"{where}.encrypted_content was not produced by this server", param=where) from None


class ResponseStore:
    """A bounded LRU of stored responses: id -> (the response object, the conversation as chat messages)."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"responses_store_size must be >= 0, got {size}")
        self.size = size
        self._items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, rid: str, response: dict, conversation: list[dict]) -> None:
        if self.size == 0:
            return
        self._items[rid] = (response, conversation)
        self._items.move_to_end(rid)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, rid: str) -> tuple[dict, list[dict]] | None:
        item = self._items.get(rid)
        if item is not None:
            self._items.move_to_end(rid)
        return item

    def delete(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None

    def __len__(self) -> int:
        return len(self._items)


# ====================================================================== input -> chat messages

def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param=where)
    parts = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(p.get("text"), str):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise APIError(400, f"{where}.content[{j}]: only text parts (input_text, output_text) are supported "
                                f"(got {kind!r})", param=f"{where}.content")
        parts.append(p["text"])
    return "".join(parts)


def _arguments(args, where: str) -> dict:
    """A function_call item's `arguments` (JSON text of an object) as a dict."""
    if args is None or args == "":
        return {}
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        raise APIError(400, f"{where}.arguments is not valid JSON", param=f"{where}.arguments") from None
    if not isinstance(args, dict):
        raise APIError(400, f"{where}.arguments must be a JSON object", param=f"{where}.arguments")
    return args


def _reasoning_text(item: dict, where: str) -> str:
    if item.get("encrypted_content"):
        return unseal(item["encrypted_content"], where)
    for key in ("content", "summary"):
        parts = item.get(key)
        if parts:
            if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                      for p in parts):
                raise APIError(400, f"{where}.{key} must be a list of text parts", param=where)
            return "\n".join(p["text"] for p in parts)
    return ""


def input_messages(items, param: str = "input") -> list[dict]:
    """Responses input (a string or items) as chat messages (the dicts chat's template rendering takes)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    reasoning: list[str] = []
    open_turn = False                      # the last message is an assistant turn that calls may join

    def assistant() -> dict:
        nonlocal open_turn
        if not open_turn:
            out.append({"role": "assistant", "content": ""})
            open_turn = True
        msg = out[-1]
        if reasoning:
            msg["reasoning_content"] = "\n".join(filter(None, [msg.get("reasoning_content")] + reasoning))
            reasoning.clear()
        return msg

    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = ROLES.get(item.get("role"))
            if role is None:
                raise APIError(400, f"{where}.role must be one of user, assistant, system, developer "
                                    f"(got {item.get('role')!r})", param=f"{where}.role")
            if "content" not in item:
                raise APIError(400, f"{where}.content is required", param=f"{where}.content")
            text = _text(item["content"], where)
            if role == "assistant":
                if open_turn and out[-1].get("tool_calls"):
                    open_turn = False          # text after a call starts a new turn
                msg = assistant()
                msg["content"] += text
            else:
                out.append({"role": role, "content": text})
                open_turn = False
        elif kind == "reasoning":
            if open_turn and (out[-1]["content"] or out[-1].get("tool_calls")):
                open_turn = False              # reasoning opens the next assistant turn
            reasoning.append(_reasoning_text(item, where))
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
                raise APIError(400, f"{where}: a function_call item needs call_id and name", param=where)
            args = _arguments(item.get("arguments"), where)
            assistant().setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or "output" not in item:
                raise APIError(400, f"{where}: a function_call_output item needs call_id and output", param=where)
            output = item["output"]
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _text(output, where)})
            open_turn = False
        else:
            raise APIError(400, f"{where}.type: {kind!r} items are not supported (this server reads message, "
                                "reasoning, function_call and function_call_output items)", param=f"{where}.type")
    if reasoning:
        assistant()
    if not out:
        raise APIError(400, f"{param} must not be empty", param=param)
    return out


def function_tools(tools: list[dict] | None) -> list[dict]:
    """The function tools (Responses' flat shape), in chat's nested shape; other tool types are ignored."""
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or not isinstance(t.get("type"), str):
            raise APIError(400, f"tools[{i}] must be an object with a type", param=f"tools[{i}]")
        if t["type"] != "function":
            continue
        fn = {"name": t.get("name"), "parameters": t.get("parameters") or {"type": "object", "properties": {}}}
        if t.get("description") is not None:
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


# ====================================================================== planning

def plan_response(server: Server, store: ResponseStore, req: ResponsesRequest) -> tuple[ChatPlan, list[dict]]:
    """(the chat plan, the conversation so far without instructions: what a continuation starts from)."""
    history: list[dict] = []
    if req.previous_response_id is not None:
        prev = store.get(req.previous_response_id)
        if prev is None:
            raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = prev[1]
    if isinstance(req.input, list) and not req.input and not history:
        raise APIError(400, "input must not be empty", param="input")
    conversation = history + (input_messages(req.input) if req.input != [] else [])
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    tools = function_tools(req.tools)
    if tools:
        server.check_tools(tools)
    names = [t["function"]["name"] for t in tools]
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    forced, note = None, None
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(400, "tool_choice must be none, auto, required or {type: function, name}",
                           param="tool_choice")
        if choice["name"] not in names:
            raise APIError(400, f"tool_choice names the function {choice['name']!r}, which is not in tools",
                           param="tool_choice")
        forced, note = choice["name"], f"You must call the function `{choice['name']}` now."
    elif choice == "required":
        if not tools:
            raise APIError(400, "tool_choice 'required' needs function tools", param="tool_choice")
        note = "You must call at least one of the functions listed above."
    elif choice not in ("auto", "none"):
        raise APIError(400, f"tool_choice must be none, auto, required or {{type: function, name}} (got {choice!r})",
                       param="tool_choice")
    parse_tools = bool(tools) and choice != "none"
    if note:
        messages = with_system_note(messages, note)
    effort = req.reasoning.effort if req.reasoning else None
    if effort == "xhigh":
        effort = "high"
    if effort is not None and effort not in EFFORT:
        raise APIError(400, f"reasoning.effort must be one of {', '.join(EFFORT)}, got {effort!r}",
                       param="reasoning.effort")
    kwargs: dict = {"truncate_history_thinking": False}
    mode, budget = thinking_settings(server, effort, kwargs, None, "reasoning")
    text, ids = server.render(messages, tools if parse_tools else None, kwargs)
    # text.format is chat's response_format with json_schema's fields at the top level ({type, name, schema})
    fields = server.constraints(tools, forced, choice == "required", parse_tools, req.parallel_tool_calls,
                                server.structured(req.text.format if req.text else None, "text.format"))
    params = server.params(
        n=1, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, max_tokens=req.max_output_tokens,
        skip_special_tokens=False, reasoning_mode=answer_mode(mode, budget, fields), thinking_budget=budget,
        **fields)
    params = server.check_request(ids, params, {"prompt": "input", "max_tokens": "max_output_tokens",
                                                "structured_outputs": "text.format" if req.text else "tools"})
    plan = ChatPlan(ids, params, thinking=text.rfind("<think>") > text.rfind("</think>"), tools=tools or None,
                    parse_tools=parse_tools, parallel=req.parallel_tool_calls)
    return plan, conversation


# ====================================================================== output

def reasoning_item(text: str, seal_it: bool, rid: str | None = None, done: bool = True,
                   status: str = "completed") -> dict:
    return {"id": rid or _id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if done else [],
            "encrypted_content": seal(text) if seal_it and done else None,
            "status": status if done else "in_progress"}


def message_item(text: str, mid: str | None = None, done: bool = True, status: str = "completed") -> dict:
    return {"id": mid or _id("msg"), "type": "message", "role": "assistant",
            "status": status if done else "in_progress",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if done else []}


def call_item(call_id: str, name: str, arguments: str, fid: str | None = None, done: bool = True) -> dict:
    return {"id": fid or _id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments if done else "", "status": "completed" if done else "in_progress"}


def usage(final) -> dict:
    out = len(final.outputs[0].token_ids)
    prompt = len(final.prompt_token_ids)
    return {"input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out,
            "input_tokens_details": {"cached_tokens": final.metrics.num_cached_tokens, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": final.metrics.reasoning_tokens}}


def response_object(req: ResponsesRequest, rid: str, created: float, output: list[dict], status: str,
                    usage_: dict | None) -> dict:
    effort = req.reasoning.effort if req.reasoning else None
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "completed_at": time.time() if status == "completed" else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": req.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": effort, "summary": req.reasoning.summary if req.reasoning else None},
            "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": (req.text.format if req.text and req.text.format else {"type": "text"})},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": [t for t in req.tools or [] if t.get("type") == "function"],
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
            "usage": usage_, "metadata": req.metadata or {}, "user": req.user}


def output_items(final, plan: ChatPlan, seal_it: bool) -> list[dict]:
    c = final.outputs[0]
    d = parse_output(c.text, plan.thinking, plan.tools, plan.parse_tools)
    calls = d.tool_calls if plan.parallel else d.tool_calls[:1]
    items = []
    if d.reasoning:
        items.append(reasoning_item(d.reasoning, seal_it))
    if d.content or not calls:
        items.append(message_item(d.content))
    items += [call_item(tc.id, tc.name, tc.arguments_json) for tc in calls]
    if _status(final) == "incomplete":              # the item max_output_tokens cut (and the empty answer after it)
        cut = items[-2:] if len(items) == 2 and not d.content and not calls else items[-1:]
        for item in cut:
            item["status"] = "incomplete"
    return items


def _status(final) -> str:
    return "incomplete" if final.outputs[0].finish_reason == "length" else "completed"


class EventStream:
    """Turns the parser's deltas into Responses stream events, one output item open at a time."""

    def __init__(self, req: ResponsesRequest, rid: str, seal_it: bool):
        self.req, self.rid, self.seal_it = req, rid, seal_it
        self.created = time.time()
        self.seq = 0
        self.items: list[dict] = []            # finished output items
        self.open: dict | None = None          # the item being streamed
        self.text = ""

    def event(self, kind: str, **fields) -> str:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def snapshot(self, status: str, usage_=None) -> dict:
        return response_object(self.req, self.rid, self.created, list(self.items), status, usage_)

    def begin(self) -> list[str]:
        return [self.event("response.created", response=self.snapshot("in_progress")),
                self.event("response.in_progress", response=self.snapshot("in_progress"))]

    def _start(self, item: dict, part: dict | None) -> list[str]:
        out = self.close()
        self.open, self.text = item, ""
        out.append(self.event("response.output_item.added", output_index=len(self.items), item=item))
        if part is not None:
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=len(self.items),
                                  content_index=0, part=part))
        return out

    def close(self, status: str = "completed") -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        at, iid, text = len(self.items), item["id"], self.text
        if item["type"] == "reasoning":
            done = reasoning_item(text, self.seal_it, iid, status=status)
            part = done["content"][0]
            out = [self.event("response.reasoning_text.done", item_id=iid, output_index=at, content_index=0,
                              text=text)]
        else:
            done = message_item(text, iid, status=status)
            part = done["content"][0]
            out = [self.event("response.output_text.done", item_id=iid, output_index=at, content_index=0,
                              text=text, logprobs=[])]
        out.append(self.event("response.content_part.done", item_id=iid, output_index=at, content_index=0,
                              part=part))
        out.append(self.event("response.output_item.done", output_index=at, item=done))
        self.items.append(done)
        return out

    def feed(self, piece: dict) -> list[str]:
        if "reasoning_content" in piece:
            out = [] if self.open and self.open["type"] == "reasoning" else \
                self._start(reasoning_item("", False, done=False), {"type": "reasoning_text", "text": ""})
            self.text += piece["reasoning_content"]
            return out + [self.event("response.reasoning_text.delta", item_id=self.open["id"],
                                     output_index=len(self.items), content_index=0,
                                     delta=piece["reasoning_content"])]
        if "content" in piece:
            out = [] if self.open and self.open["type"] == "message" else \
                self._start(message_item("", done=False),
                            {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            self.text += piece["content"]
            return out + [self.event("response.output_text.delta", item_id=self.open["id"],
                                     output_index=len(self.items), content_index=0, delta=piece["content"],
                                     logprobs=[])]
        fn = piece["tool_calls"][0]
        out = self.close()
        at, args = len(self.items), fn["function"]["arguments"]
        item = call_item(fn["id"], fn["function"]["name"], args)
        out += [self.event("response.output_item.added", output_index=at,
                           item=call_item(fn["id"], fn["function"]["name"], args, item["id"], done=False)),
                self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=at,
                           delta=args),
                self.event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                           name=item["name"], arguments=args),
                self.event("response.output_item.done", output_index=at, item=item)]
        self.items.append(item)
        return out

    def finish(self, final) -> tuple[list[str], dict]:
        status = _status(final)
        out = self.close(status)
        if not any(i["type"] in ("message", "function_call") for i in self.items):
            out += self._start(message_item("", done=False),
                               {"type": "output_text", "text": "", "annotations": [], "logprobs": []}) + \
                self.close(status)
        response = self.snapshot(status, usage(final))
        out.append(self.event(f"response.{status}", response=response))
        return out, response


async def response_stream(server: Server, store: ResponseStore, plan: ChatPlan, req: ResponsesRequest, rid: str,
                          conversation: list[dict]):
    ev = EventStream(req, rid, ENCRYPTED in (req.include or []))
    st = ChatStreamState(StreamParser(plan.thinking, plan.tools, plan.parse_tools), plan.parallel)
    try:
        for e in ev.begin():
            yield e
        async with aclosing(server.run(plan.ids, plan.params, "responses")) as gen:
            async for out in gen:
                c = out.outputs[0]
                d = st.parser.feed(c.delta_text)
                if c.finished:
                    d += st.parser.finish()
                for piece in st.deltas(d):
                    for e in ev.feed(piece):
                        yield e
                if out.finished:
                    events, response = ev.finish(out)
                    if req.store:
                        store.put(rid, response, conversation + input_messages(response["output"], "output"))
                    for e in events:
                        yield e
    except APIError as e:
        yield ev.event("error", code=e.code or e.type, message=e.message, param=e.param)
    except Exception:
        log.exception("responses stream failed")
        yield ev.event("error", code="server_error", message="internal server error", param=None)


def add_routes(app: FastAPI, server: Server, store_size: int) -> None:
    store = ResponseStore(store_size)
    app.state.responses_store = store

    @app.post("/v1/responses")
    async def create(req: ResponsesRequest, request: Request):
        server.check_model(req.model)
        plan, conversation = plan_response(server, store, req)
        server.admit(1)
        rid = _id("resp")
        if req.stream:
            return StreamingResponse(response_stream(server, store, plan, req, rid, conversation),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        created = time.time()
        final = await until_disconnect(request, server.final(plan.ids, plan.params, "responses"))
        if final is None:
            return Response(status_code=499)
        output = output_items(final, plan, ENCRYPTED in (req.include or []))
        body = response_object(req, rid, created, output, _status(final), usage(final))
        if req.store:
            store.put(rid, body, conversation + input_messages(output, "output"))
        return JSONResponse(body)

    def stored(response_id: str) -> dict:
        item = store.get(response_id)
        if item is None:
            raise APIError(404, f"No response found with id '{response_id}'.", param="response_id",
                           code="response_not_found")
        return item[0]

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str):
        return JSONResponse(stored(response_id))

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str):
        stored(response_id)
        store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


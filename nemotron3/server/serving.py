"""The request -> engine core shared by the OpenAI and Anthropic routes (`Server`): limits and admission,
the engine's request checks as 400s, chat rendering, running an engine request with metrics, and the
per-choice streaming state. The protocol modules (openai.py, anthropic.py) turn their requests into a
`ChatPlan` (or prompt ids + params) with these pieces and format the engine's outputs.

Design decisions (see also the README's "Serving" section):

* **Checks before streaming.** Everything the engine would refuse (context length, max_tokens, token ids,
  stop strings without a tokenizer) is checked with the engine's own `check_request` before a response
  starts, so it gets a real status code, not an error event; the rule lives once, in the engine.
* **Admission: 429, no queueing in the server.** The engine already queues sequences beyond
  `max_num_seqs`; the server refuses (429, `Retry-After: 1`) a request that would bring the sequences it
  has in flight above `max_pending`. Nothing waits in the server, so nothing can hang there.
* **Tool calls that cannot miss** (`constraints`, grammars from engine/tool_grammar.py): tool_choice
  `required` / a named function appends a line to the system prompt ("You must call ...") AND makes the whole
  answer (after `</think>`) calls in the XML format, to the declared tools (the named one) with arguments
  valid for their JSON schemas. `auto`: free text, but once the model opens `<tool_call>` the call names a
  declared tool (arguments schema-checked for `strict` tools). No tools or tool_choice `none`: the
  `<tool_call>` / `</tool_call>` tokens are banned, so such a request never returns a call.
* **Structured outputs** (`response_format` json_schema / json_object, Anthropic `output_format`,
  Responses `text.format`: `structured`) become the engine's `StructuredOutputs`; a schema the grammar
  library refuses is a 400 naming the field. When thinking is on without a budget, a constrained request
  gets the medium budget (at most half of max_tokens) so the answer has room.
* **Nothing slow on the event loop.** Planning a request (chat rendering, tokenisation: seconds for a
  multi-MB prompt) runs in a worker thread (`offload`), so streams and /health go on meanwhile.
* The server talks to `AsyncLLMEngine`'s public surface only (never to the sync engine behind it).
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from ..chat.parsers import CALL_CLOSE, CALL_OPEN, Delta, StreamParser
from ..engine import AsyncLLMEngine, RequestError, SamplingParams, StructuredOutputs
from ..engine.tool_grammar import ToolGrammarError, call_grammar
from ..tokenizer import encode_text, scrub_surrogates
from . import protocol
from .metrics import ServerMetrics
from .protocol import APIError

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def _params_error(e: ValueError) -> APIError:
    """SamplingParams' own value check as a 400 naming the field."""
    field = re.match(r"SamplingParams\.(\w+)", str(e))
    return APIError(400, str(e).replace("SamplingParams.", ""), param=field and field.group(1))


@dataclass
class ChatPlan:
    """Everything a chat request (OpenAI chat or Anthropic messages) turns into before it reaches the engine."""
    ids: list[int]                      # the rendered prompt's token ids
    params: SamplingParams
    thinking: bool                      # the prompt leaves a <think> block open
    tools: list[dict] | None            # OpenAI-style tool schemas (for the parser)
    parse_tools: bool                   # parse <tool_call> blocks (False: tool_choice none)
    parallel: bool = True               # keep every call (False: the first only)
    include_usage: bool = False         # OpenAI stream_options.include_usage
    top_logprobs: int = 0


class Server:
    """State shared by the routes: the engine, the tokenizer, limits and metrics."""

    def __init__(self, engine: AsyncLLMEngine, names: list[str], api_key: str | None, max_model_len: int,
                 max_pending: int, max_body_bytes: int, max_n: int):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.names, self.api_key = names, api_key
        self.max_model_len, self.max_pending, self.max_body_bytes, self.max_n = \
            max_model_len, max_pending, max_body_bytes, max_n
        self.inflight = 0                          # sequences the server has handed to the engine
        self.metrics = ServerMetrics(names[0], engine.snapshot)
        self._n = 0

    # ------------------------------------------------------------------ shared checks
    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(404, f"The model `{name}` does not exist. Available: {', '.join(self.names)}.",
                           param="model", code="model_not_found")

    def admit(self, n: int) -> None:
        if self.inflight + n > self.max_pending:
            raise APIError(429, f"The server is at its limit of {self.max_pending} sequences in flight; "
                                "retry shortly.", code="too_many_requests", headers={"Retry-After": "1"})

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise APIError(400, f"n must be <= {self.max_n}, got {n}", param="n")

    def check_stop(self, stop, param="stop") -> list[str]:
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if len(stop) > protocol.MAX_STOP:
            raise APIError(400, f"{param}: at most {protocol.MAX_STOP} stop sequences are allowed", param=param)
        for s in stop:
            if not s:
                raise APIError(400, f"{param}: stop sequences must be non-empty strings", param=param)
            if len(s) > protocol.MAX_STOP_LEN:
                raise APIError(400, f"{param}: stop sequences must be at most {protocol.MAX_STOP_LEN} characters",
                               param=param)
        return stop

    def penalties(self, req) -> dict:
        """presence / frequency / repetition penalties and logit_bias (OpenAI: token-id strings as keys)."""
        bias = None
        if req.logit_bias:
            bias = {}
            for key, v in req.logit_bias.items():
                if not key.isdigit():                # the range is the engine's check
                    raise APIError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias")
                bias[int(key)] = v
        return dict(presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                    logit_bias=bias)

    def params(self, **kw) -> SamplingParams:
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise _params_error(e) from None

    def check_request(self, ids: list[int], params: SamplingParams, names: dict[str, str] | None = None
                      ) -> SamplingParams:
        """The engine's request checks (`check_request`) under this server's context limit, before any
        response starts: a refusal is a 400 naming the request's own field (`names` maps the engine's
        parameter names onto the request's). Returns the params with max_tokens filled in when unset."""
        try:
            max_tokens = self.engine.check_request(ids, params, self.max_model_len)
        except RequestError as e:
            raise APIError(400, str(e), param=(names or {}).get(e.param, e.param), code=e.code) from None
        if params.max_tokens is not None:
            return params
        try:
            return dataclasses.replace(params, max_tokens=max_tokens)
        except ValueError as e:
            raise _params_error(e) from None

    def structured(self, fmt: dict | None, param: str) -> StructuredOutputs | None:
        """A response format (`{"type": "text" | "json_object" | "json_schema", ...}`, OpenAI's shape with the
        schema under `json_schema.schema`, or Anthropic's / Responses' with it under `schema`) as the engine's
        StructuredOutputs (None for text)."""
        kind = (fmt or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutputs(json_object=True)
        if kind != "json_schema":
            raise APIError(400, f"{param}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param=param)
        schema = (fmt.get("json_schema") or {}).get("schema") if "json_schema" in fmt else fmt.get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, f"{param}: a json_schema format needs a JSON Schema object under 'schema'",
                           param=param)
        return StructuredOutputs(json=schema)

    def constraints(self, tools: list[dict] | None, forced: str | None, required: bool, parse_tools: bool,
                    parallel: bool, fmt: StructuredOutputs | None) -> dict:
        """SamplingParams fields for a chat request's response format and tool calls (see the module notes)."""
        open_, close = (self.tokenizer.token_to_id(t) if hasattr(self.tokenizer, "token_to_id") else None
                        for t in (CALL_OPEN, CALL_CLOSE))
        if fmt is not None:
            return {"structured_outputs": fmt}
        if open_ is None or close is None:         # a tokenizer without call tokens: force the opening text
            if not (forced or required):
                return {}
            return {"answer_prefix_ids": self.encode(f"{CALL_OPEN}\n<function={forced}>\n" if forced
                                                     else f"{CALL_OPEN}\n<function=")}
        if not (tools and parse_tools):
            return {"banned_token_ids": [open_, close]}
        try:
            if forced or required:
                # the call tokens are also banned, which matters while the model thinks (the grammar starts after
                # </think>): in the answer the grammar makes each the only choice where it comes, and wins
                g = call_grammar(tools, open_, close, names=[forced] if forced else None, parallel=parallel and
                                 not forced)
                return {"structured_outputs": StructuredOutputs(grammar=g), "banned_token_ids": [open_, close]}
            g = call_grammar(tools, open_, close, strict=False, triggered=True)
        except ToolGrammarError as e:
            raise APIError(400, f"tools: {e}", param="tools") from None
        return {"structured_outputs": StructuredOutputs(grammar=g, trigger=open_)}

    def encode(self, text: str) -> list[int]:
        """Prompt ids, through `encode_batch` where the tokenizer has one: `tokenizers` releases the GIL there
        (not in `encode`), so a worker thread tokenising a huge prompt does not stall the event loop."""
        batch = getattr(self.tokenizer, "encode_batch", None)
        return list(batch([scrub_surrogates(text)])[0]) if batch else encode_text(self.tokenizer, text)

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False)

    # ------------------------------------------------------------------ chat rendering
    def check_tools(self, tools: list[dict], param="tools") -> None:
        seen = set()
        for i, t in enumerate(tools):
            fn = t["function"]
            name = fn.get("name")
            if not isinstance(name, str) or not TOOL_NAME.match(name):
                raise APIError(400, f"{param}[{i}]: a tool name must be 1-64 characters from [A-Za-z0-9_.:-], "
                                    f"got {name!r}", param=f"{param}[{i}]")
            if name in seen:
                raise APIError(400, f"{param}[{i}]: duplicate tool name {name!r}", param=f"{param}[{i}]")
            seen.add(name)
            schema = fn.get("parameters")
            if schema is not None:
                if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                    raise APIError(400, f"{param}[{i}]: the parameters schema must be a JSON Schema object "
                                        "(type 'object')", param=f"{param}[{i}]")
                props = schema.get("properties", {})
                if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
                    raise APIError(400, f"{param}[{i}]: parameters.properties must map names to schemas",
                                   param=f"{param}[{i}]")

    def render(self, messages: list[dict], tools: list[dict] | None, kwargs: dict) -> tuple[str, list[int]]:
        if self.tokenizer is None or not hasattr(self.tokenizer, "apply_chat_template"):
            raise APIError(400, "this model has no tokenizer with a chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=False, **kwargs)
        except Exception as e:                  # TemplateError (raise_exception), bad kwargs, ...
            raise APIError(400, f"the chat could not be rendered with the model's chat template: {e}") from None
        return text, self.encode(text)

    async def offload(self, plan, *args, **kw):
        """`plan(*args, **kw)` (a request's rendering and tokenisation) in a worker thread, off the event loop."""
        return await asyncio.to_thread(plan, *args, **kw)

    # ------------------------------------------------------------------ running requests
    async def run(self, ids: list[int], params: SamplingParams, endpoint: str) -> AsyncIterator:
        """Stream one engine request's outputs, recording metrics; leaving early aborts it."""
        self._n += 1
        rid = f"{endpoint}-{self._n}-{uuid.uuid4().hex[:8]}"
        self.inflight += params.n
        self.metrics.request(endpoint)
        t0 = last = time.monotonic()
        first, finished = True, False
        try:
            async with aclosing(self.engine.generate(ids, params, rid)) as gen:
                async for out in gen:
                    now = time.monotonic()
                    new = sum(len(c.delta_token_ids) for c in out.outputs)
                    if new:
                        if first:
                            self.metrics.first_token(now - t0)
                            first = False
                        else:
                            self.metrics.tokens(now - last, new)
                        last = now
                    if out.finished:
                        finished = True
                        self.metrics.done(out, now - t0)
                    yield out
        except ValueError as e:                  # the engine refused the request (checked before: a race)
            finished = True
            raise APIError(400, str(e), param=getattr(e, "param", None)) from None
        finally:
            self.inflight -= params.n
            if not finished:
                self.metrics.aborted(params.n)

    async def final(self, ids, params, endpoint):
        out = None
        async with aclosing(self.run(ids, params, endpoint)) as gen:
            async for out in gen:
                pass
        return out


class ChatStreamState:
    """Per-choice streaming state: the parser's deltas as stream deltas, unchanged (the parser holds back the
    whitespace next to tool calls itself, so streamed content equals the non-streamed), and call indices
    (only the first call when not `parallel`)."""

    def __init__(self, parser: StreamParser, parallel: bool):
        self.parser, self.parallel = parser, parallel
        self.n_tokens = 0
        self.n_calls = 0
        self.done = False

    def deltas(self, d: Delta) -> list[dict]:
        out = []
        if d.reasoning:
            out.append({"reasoning_content": d.reasoning})
        if d.content:
            out.append({"content": d.content})
        for tc in d.tool_calls:
            if self.n_calls and not self.parallel:
                continue
            out.append({"tool_calls": [{"index": self.n_calls, "id": tc.id, "type": "function",
                                        "function": {"name": tc.name, "arguments": tc.arguments_json}}]})
            self.n_calls += 1
        return out


def answer_mode(mode: str, budget: int | None, fields: dict) -> str:
    """The reasoning mode for a request whose whole answer is constrained: regular thinking without a budget
    becomes medium (a budget of at most half of max_tokens), so the constrained answer has room."""
    so = fields.get("structured_outputs")
    return "medium" if so is not None and so.trigger is None and mode == "regular" and budget is None else mode


def with_system_note(messages: list[dict], note: str) -> list[dict]:
    """`note` appended to the system message (one is added if there is none): how tool_choice steers."""
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = (first.get("content") or "").rstrip() + ("\n\n" if first.get("content") else "") + note
        return [first] + messages[1:]
    return [{"role": "system", "content": note}] + messages

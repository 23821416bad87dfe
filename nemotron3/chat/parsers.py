"""Reasoning and tool-call parsing of generated text, incremental so it works while streaming.

Nemotron 3 writes its reasoning inside `<think>...</think>` (the generation prompt already opened
`<think>` when thinking is on) and calls tools in Qwen3-Coder XML:

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

`StreamParser.feed(delta)` turns text deltas into reasoning / content deltas and complete tool calls;
`parse_output` is the same parser fed the whole text, so streamed and whole results are identical by
construction. Tool calls follow vLLM's `qwen3_coder` parser (lenient XML, schema-typed arguments) and
reasoning its `nemotron_v3` parser; where we differ, README.md (Serving, tool calls) has the table.
Decisions:

* Whitespace: only the template's own separators are removed, so a parsed message re-renders through
  the chat template to exactly the generated text: one `\\n` after `<think>`, one before `</think>`,
  one after `</think>`, and all whitespace next to a tool call (the template writes `trim(content)\\n`
  before the calls). Whitespace next to calls is held back while streaming until the next text shows
  which side of a call it is on.
* A `<tool_call>` inside unclosed reasoning ends the reasoning (the token is a call, not prose).
* Malformed XML is recovered the way vLLM recovers it (a missing `</parameter>` ends at the next
  `<parameter=` or `</function>`, a missing `</function>` / `</tool_call>` at the end of the text), and a
  parameter value is never dropped: a block that still does not parse is returned as content.
* A leading `<think>` is parsed as reasoning even when thinking is off (both paths, unlike vLLM).
"""
from __future__ import annotations

import ast
import json
import math
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=(.*?)</function>|<function=(.*)$", re.S)
_PARAM = re.compile(r"<parameter=(.*?)(?:(</parameter>)|(?=<parameter=)|(?=</function>)|$)", re.S)
_BAD_NAME = re.compile(r"[\s{}<>\"']")
_STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")
_INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])
    well_formed: bool = True     # False: recovered from missing closing tags (RL grades it a format error)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def __iadd__(self, other: "Delta") -> "Delta":
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


def _schemas(tools: list | None) -> dict[str, dict]:
    """{function name: {parameter: JSON schema}} from OpenAI (`parameters`) or Anthropic (`input_schema`) tools."""
    out = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        params = fn.get("parameters") or fn.get("input_schema") or {}
        props = params.get("properties") if isinstance(params, dict) else None
        out[fn.get("name", "")] = props if isinstance(props, dict) else {}
    return out


def schema_type(schema) -> tuple[str, bool]:
    """(lower-case type name, whether null is allowed): `type` (a list names its first non-null type),
    else the first non-null `anyOf` / `oneOf` option, else "string"."""
    if not isinstance(schema, dict):
        return "string", False
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    else:
        names = [o.get("type") for o in schema.get("anyOf") or schema.get("oneOf") or []
                 if isinstance(o, dict) and "type" in o]
    names = [str(n).strip().lower() for n in names]
    typed = [n for n in names if n != "null"]
    return (typed[0] if typed else "null" if names else "string"), "null" in names


def _literal(value: str):
    """`ast.literal_eval` as JSON data (tuples become lists); text when it is none (sets, bytes, nan...)."""
    try:
        return json.loads(json.dumps(ast.literal_eval(value), allow_nan=False))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return value


def convert_value(value: str, schema) -> object:
    """Parameter text -> value, by the parameter's schema as vLLM's qwen3_coder does. No schema (unknown
    tool or parameter): the text. Null-like text (`null`, `None`) is None unless the type is a string one
    (then only if the schema allows null); numbers, booleans (`true`/`True`) and containers (JSON, then
    Python literal, which is how the template spells them) are typed; anything that fails stays text."""
    if schema is None:
        return value
    typ, nullable = schema_type(schema)
    low = value.lower()
    if low in ("null", "none") and (nullable or typ not in _STRING_TYPES):
        return None
    if typ in _STRING_TYPES:
        return value
    if typ.startswith(_INT_PREFIXES):
        try:
            return int(value)
        except ValueError:
            return value
    if typ.startswith(("num", "float")):
        try:
            f = float(value)
        except ValueError:
            return value
        return value if not math.isfinite(f) else int(f) if f.is_integer() else f
    if typ in ("boolean", "bool", "binary"):
        return low == "true"
    if typ in ("object", "array", "arr") or typ.startswith(("dict", "list")):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return _literal(value)


def parse_tool_call(block: str, tools: list | None = None, closed: bool = True) -> list[ToolCall] | None:
    """The calls inside one `<tool_call>` body (`closed`: its `</tool_call>` was seen); None when it holds
    no well-named `<function=NAME>` or a parameter without a name, so its text is kept as content."""
    schemas = _schemas(tools)
    calls = []
    tidy = closed and not _FUNCTION.sub("", block).strip()
    for m in _FUNCTION.finditer(block):
        fn = m.group(1) if m.group(1) is not None else m.group(2)
        name, gt, body = fn.partition(">")
        name = name.strip()
        if not gt or not name or _BAD_NAME.search(name):
            return None
        props = schemas.get(name)
        args = {}
        well_formed = tidy and m.group(1) is not None and not _PARAM.sub("", body).strip()
        for p in _PARAM.finditer(body):
            pname, gt, value = p.group(1).partition(">")
            pname = pname.strip()
            if not gt or not pname:
                return None
            well_formed = well_formed and p.group(2) is not None
            value = value[1:] if value.startswith("\n") else value
            value = value[:-1] if value.endswith("\n") else value
            args[pname] = convert_value(value, props.get(pname) if props is not None else None)
        calls.append(ToolCall(name, args, well_formed=well_formed))
    return calls or None


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def _cut(text: str, prefix: bool) -> str:
    """Drop one separator newline from the start (`prefix`) or the end of `text`."""
    if prefix:
        return text[1:] if text.startswith("\n") else text
    return text[:-1] if text.endswith("\n") else text


class StreamParser:
    """Feed generated text deltas; get reasoning, content and tool calls out.

    `thinking=True` means the prompt opened `<think>`, so the output starts as reasoning; either way an
    output that starts with `<think>` opens reasoning. `parse_tools=False` leaves `<tool_call>` text in
    the content (tool_choice "none")."""

    def __init__(self, thinking: bool = True, tools: list | None = None, parse_tools: bool = True):
        self.thinking, self.tools, self.parse_tools = thinking, tools, parse_tools
        self.state = "start"
        self.buf = ""
        self.n_calls = 0
        self._strip_next = False     # one separator "\n" still to drop at the start of the next text
        self._ws = ""                # content whitespace held back: it may sit next to a tool call
        self._after_call = False     # the held whitespace follows a tool call
        self._has_content = False    # some content was emitted (whitespace after a call separates)

    def _tags(self) -> tuple[str, ...]:
        if self.state == "start":
            return (THINK_OPEN,)
        if self.state == "reasoning":
            return (THINK_CLOSE, CALL_OPEN) if self.parse_tools else (THINK_CLOSE,)
        if self.state == "call":
            return (CALL_CLOSE,)
        return (CALL_OPEN,) if self.parse_tools else ()

    def _content(self, text: str, out: Delta) -> None:
        """Emit content, holding back trailing whitespace; whitespace after a call is kept only between
        two pieces of content."""
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if body and self._after_call:
            stripped = body.lstrip()
            body = body if self._has_content else stripped
            self._after_call = False
        if body:
            out.content += body
            self._has_content = True

    def _call(self, block: str, closed: bool, out: Delta) -> None:
        calls = parse_tool_call(block, self.tools, closed)
        if calls is None:                  # not a call: its text (and the whitespace before it) is content
            self._content(CALL_OPEN + block + (CALL_CLOSE if closed else ""), out)
            return
        out.tool_calls += calls
        self.n_calls += len(calls)
        self._ws, self._after_call = "", True

    def feed(self, text: str) -> Delta:
        self.buf += text
        out = Delta()
        while True:
            if self._strip_next and self.buf:
                self.buf, self._strip_next = _cut(self.buf, True), False
            if self.state == "start":
                stripped = self.buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buf, self.state, self._strip_next = stripped[len(THINK_OPEN):], "reasoning", True
                    continue
                if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                    return out                     # could still become "<think>": wait
                self.state = "reasoning" if self.thinking else "content"
                continue
            if self.state == "reasoning":
                i = self.buf.find(THINK_CLOSE)
                j = self.buf.find(CALL_OPEN) if self.parse_tools else -1
                if i >= 0 and (j < 0 or i < j):
                    out.reasoning += _cut(self.buf[:i], False)
                    self.buf, self.state, self._strip_next = self.buf[i + len(THINK_CLOSE):], "content", True
                    continue
                if j >= 0:                          # a tool call inside the reasoning ends it
                    out.reasoning += _cut(self.buf[:j], False)
                    self.buf, self.state = self.buf[j + len(CALL_OPEN):], "call"
                    continue
            elif self.state == "content":
                j = self.buf.find(CALL_OPEN) if self.parse_tools else -1
                if j >= 0:
                    self._content(self.buf[:j], out)
                    self.buf, self.state = self.buf[j + len(CALL_OPEN):], "call"
                    continue
            elif self.state == "call":
                i = self.buf.find(CALL_CLOSE)
                if i < 0:
                    return out                     # wait for the whole call
                block, self.buf = self.buf[:i], self.buf[i + len(CALL_CLOSE):]
                self._call(block, True, out)
                self.state = "content"
                continue
            keep = _partial_suffix(self.buf, self._tags())
            if self.state == "reasoning" and self.buf[:len(self.buf) - keep].endswith("\n"):
                keep += 1                          # may be the separator before </think>
            emit, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            if self.state == "reasoning":
                out.reasoning += emit
            else:
                self._content(emit, out)
            return out

    def finish(self) -> Delta:
        """Flush at the end of generation. Unclosed reasoning stays reasoning; an unterminated tool call
        (e.g. cut by max_tokens) is parsed as vLLM does, or kept as content when it does not parse."""
        out = Delta()
        if self.state == "call":
            self._call(self.buf, False, out)
        elif self.state == "reasoning" or (self.state == "start" and self.thinking):
            out.reasoning = self.buf
        else:
            self._content(self.buf, out)
        if not self.n_calls:
            out.content += self._ws
        self.buf, self._ws, self.state = "", "", "content"
        return out


def parse_output(text: str, thinking: bool = True, tools: list | None = None,
                 parse_tools: bool = True) -> Delta:
    """Parse a whole generation at once (the streaming parser fed one delta)."""
    p = StreamParser(thinking, tools, parse_tools)
    out = p.feed(text)
    out += p.finish()
    return out

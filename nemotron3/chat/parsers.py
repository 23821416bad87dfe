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

`StreamParser.feed(delta)` turns text deltas into reasoning / content deltas and complete tool calls.
It holds back only a suffix that could still become one of the tags, so text is never delayed longer
than a tag's length. It survives what models really emit: reasoning that never closes (it stays
reasoning), a tool call inside the reasoning (the `<tool_call>` ends the reasoning), several tool
calls, text between calls, and malformed XML (returned as plain content, never an error).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
_PARAM = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

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


def _param_types(tools: list | None) -> dict[str, dict[str, str]]:
    """{function name: {parameter: JSON-schema type}} from OpenAI-style tool definitions."""
    out = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        props = (fn.get("parameters") or fn.get("input_schema") or {}).get("properties", {}) or {}
        out[fn.get("name", "")] = {k: (v or {}).get("type", "") for k, v in props.items() if isinstance(v, dict)}
    return out


def _convert(value: str, typ: str):
    """Parameter text -> Python value: strings stay strings, everything else is tried as JSON."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    if typ == "string":
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, ValueError):
        return value


def parse_tool_call(block: str, tools: list | None = None) -> list[ToolCall] | None:
    """The calls inside one `<tool_call>...</tool_call>` body; None when it is not well-formed."""
    types = _param_types(tools)
    calls = []
    for m in _FUNCTION.finditer(block):
        name = m.group(1).strip()
        args = {p.group(1).strip(): _convert(p.group(2), types.get(name, {}).get(p.group(1).strip(), ""))
                for p in _PARAM.finditer(m.group(2))}
        calls.append(ToolCall(name, args))
    rest = _FUNCTION.sub("", block).strip()
    if not calls or rest:
        return None
    return calls


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class StreamParser:
    """Feed generated text deltas; get reasoning, content and tool calls out.

    `thinking=True` means the prompt opened `<think>`, so the output starts as reasoning. With
    `thinking=False` an output that nevertheless starts with `<think>` is still parsed as reasoning.
    `parse_tools=False` leaves `<tool_call>` text in the content (tool_choice "none").
    """

    def __init__(self, thinking: bool = True, tools: list | None = None, parse_tools: bool = True):
        self.state = "reasoning" if thinking else "start"
        self.tools, self.parse_tools = tools, parse_tools
        self.buf = ""
        self.n_calls = 0
        self._after_think = False     # drop the newline(s) the template puts after </think>

    def _tags(self) -> tuple[str, ...]:
        if self.state == "reasoning":
            return (THINK_CLOSE, CALL_OPEN) if self.parse_tools else (THINK_CLOSE,)
        if self.state == "call":
            return (CALL_CLOSE,)
        return (CALL_OPEN,) if self.parse_tools else ()

    def feed(self, text: str) -> Delta:
        self.buf += text
        out = Delta()
        while True:
            if self.state == "start":              # thinking off: allow a leading <think> anyway
                stripped = self.buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buf, self.state = stripped[len(THINK_OPEN):], "reasoning"
                    continue
                if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                    return out                     # could still be "<think>": wait
                self.state = "content"
            if self.state == "reasoning":
                i = self.buf.find(THINK_CLOSE)
                j = self.buf.find(CALL_OPEN) if self.parse_tools else -1
                if i >= 0 and (j < 0 or i < j):
                    out.reasoning += self.buf[:i]
                    self.buf, self.state, self._after_think = self.buf[i + len(THINK_CLOSE):], "content", True
                    continue
                if j >= 0:                          # a tool call inside the reasoning ends it
                    out.reasoning += self.buf[:j]
                    self.buf, self.state = self.buf[j + len(CALL_OPEN):], "call"
                    continue
            elif self.state == "content":
                if self._after_think:
                    self.buf = self.buf.lstrip("\n")
                    if not self.buf:
                        return out
                    self._after_think = False
                j = self.buf.find(CALL_OPEN) if self.parse_tools else -1
                if j >= 0:
                    out.content += self.buf[:j]
                    self.buf, self.state = self.buf[j + len(CALL_OPEN):], "call"
                    continue
            elif self.state == "call":
                i = self.buf.find(CALL_CLOSE)
                if i < 0:
                    return out                     # wait for the whole call
                block, self.buf = self.buf[:i], self.buf[i + len(CALL_CLOSE):]
                calls = parse_tool_call(block, self.tools)
                if calls is None:
                    out.content += CALL_OPEN + block + CALL_CLOSE
                else:
                    out.tool_calls += calls
                    self.n_calls += len(calls)
                self.state = "content"
                continue
            keep = _partial_suffix(self.buf, self._tags())
            emit, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            if self.state == "reasoning":
                out.reasoning += emit
            else:
                out.content += emit
            return out

    def finish(self) -> Delta:
        """Flush at the end of generation: held-back text and an unterminated tool call become content."""
        out = Delta()
        if self.state == "call":
            out.content = CALL_OPEN + self.buf
        elif self.state == "reasoning":
            out.reasoning = self.buf
        else:
            out.content = self.buf
        self.buf = ""
        self.state = "content"
        return out


def parse_output(text: str, thinking: bool = True, tools: list | None = None,
                 parse_tools: bool = True) -> Delta:
    """Parse a whole generation at once (same rules as streaming)."""
    p = StreamParser(thinking, tools, parse_tools)
    out = p.feed(text)
    out += p.finish()
    out.reasoning = out.reasoning.strip("\n")
    if out.tool_calls:          # whitespace around tool calls is layout, not an answer
        out.content = out.content.strip()
    return out

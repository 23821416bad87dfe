"""Request model of the OpenAI Responses API (`POST /v1/responses`), in protocol.py's conventions (strict types,
`null` = not given, unknown fields ignored).

`input` items, `tools` and `tool_choice` are kept as plain JSON here and checked item by item in responses.py:
their shapes are unions keyed by `type` that clients extend faster than any schema (Codex sends `namespace` and
`web_search` tools), and a hand-written check can say exactly which item is wrong and why.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field

from .protocol import Int, _Model


class ReasoningConfig(_Model):
    effort: Optional[str] = None
    summary: Optional[str] = None           # accepted; the reasoning text itself is returned, not a summary


class TextConfig(_Model):
    format: Optional[dict[str, Any]] = None     # {type: text | json_object | json_schema, ...}
    verbosity: Optional[str] = None


class ResponsesRequest(_Model):
    model: str
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    max_output_tokens: Optional[Int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    reasoning: Optional[ReasoningConfig] = None
    text: Optional[TextConfig] = None
    store: bool = True
    previous_response_id: Optional[str] = None
    include: Optional[list[str]] = None
    stream: bool = False
    metadata: Optional[dict[str, Any]] = None
    user: Optional[str] = None

"""Nemotron 3 chat template (ChatML + ``<think>`` blocks + XML-style tool calls): ``nemotron3.jinja``.

Format (what the released Nemotron 3 checkpoints were trained on)::

    <|im_start|>system\n{system}[\n\n# Tools ...]<|im_end|>\n      (always present, may be empty)
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n{content}<|im_end|>\n
    <|im_start|>user\n<tool_response>\n{result}\n</tool_response>\n<|im_end|>\n
    <|im_start|>assistant\n<think>\n                                 (generation prompt)

The template is ours; it renders byte-identically to NVIDIA's published Nano template on every
conversation shape in ``tests/data/chat_template_nvidia.json`` (rendered by NVIDIA's template). Its rules:

* Reasoning (``reasoning_content``, or a ``<think>...</think>`` inside ``content``) and content are kept
  verbatim between the separators; only the turn's two ends are trimmed. No think tags at all gives
  ``<think></think>`` + content.
* ``truncate_history_thinking`` (default on) drops the reasoning of assistant turns *before the last
  user message*: a plain answer keeps what follows the last ``</think>`` untrimmed (so
  ``<think></think>\nHello!``), a tool-calling turn keeps it trimmed (``<think></think>Calling.``).
* ``enable_thinking`` (default on) only changes the generation prompt: ``<think>\n`` vs ``<think></think>``.
* Tool-call arguments: containers as JSON, scalars with Jinja's ``|string`` (Python spelling ``True``,
  ``None``, ``1e+20``). Tool schemas: each parameter's ``type``, ``description``, ``enum`` first, then
  its other keys; extra keys of ``parameters`` (``additionalProperties``...) and of the function
  (``strict``...) as ``<key>value</key>`` with the same value spelling.

Deliberate differences, only where NVIDIA's template errors or prints a Python repr (tested):
``content`` None renders empty, a list of OpenAI content parts renders its text, ``arguments`` may be a
JSON string (needs the ``fromjson`` filter :func:`render_chat` provides; ``transformers`` has none, so
pass dicts there), and a conversation that opens with a tool result still opens a user turn.

The template only uses ``{%- -%}`` tags, so its output does not depend on ``trim_blocks`` /
``lstrip_blocks``; :func:`render_chat` nevertheless mirrors the ``transformers`` sandbox (same
``tojson``, ``raise_exception``, ``strftime_now``) so both render byte-identical strings.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (Path(__file__).parent / "nemotron3.jinja").read_text(encoding="utf-8")

_REASONING_ALIASES = ("reasoning_content", "reasoning", "thinking")


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """Same as transformers' override: no HTML escaping, unicode kept."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """Compile in a sandbox configured like ``transformers`` (plus a ``fromjson`` filter)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters["fromjson"] = json.loads
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    *,
    chat_template: str | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` (OpenAI-style dicts) to the prompt string.

    ``kwargs`` reach the template (``enable_thinking``, ``truncate_history_thinking``...).
    Like ``transformers``, ``reasoning``/``thinking`` are accepted as aliases of
    ``reasoning_content``.
    """
    msgs = []
    for m in messages:
        m = dict(m)
        if m.get("reasoning_content") is None:
            alias = next((m[k] for k in _REASONING_ALIASES[1:] if m.get(k) is not None), None)
            if alias is not None:
                m["reasoning_content"] = alias
        msgs.append(m)
    return _compile(chat_template or CHAT_TEMPLATE).render(
        messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
    )

"""Nemotron 3 chat template (ChatML + ``<think>`` blocks + XML-style tool calls).

Format (what the released Nemotron 3 checkpoints were trained on)::

    <|im_start|>system\n{system}[\n\n# Tools ...]<|im_end|>\n      (always present, may be empty)
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n{content}<|im_end|>\n
    <|im_start|>user\n<tool_response>\n{result}\n</tool_response>\n<|im_end|>\n
    <|im_start|>assistant\n<think>\n                                 (generation prompt)

Design decisions:

* Every assistant turn opens with a think block; ``<think></think>`` is synthesised when
  there is no reasoning, and with ``truncate_history_thinking`` (default on) assistant
  turns *before the last user message* keep only the empty block + content (reasoning of
  the ongoing tool-calling turn is kept). Reasoning is read from ``reasoning_content``
  or, failing that, from a ``<think>...</think>`` prefix inside ``content``.
* ``enable_thinking`` (default on) only changes the generation prompt:
  ``<think>\n`` (model thinks) vs. ``<think></think>`` (model answers directly).
* Tool arguments are rendered one ``<parameter=NAME>`` block each; strings verbatim,
  everything else JSON-encoded. ``arguments`` may be a dict or a JSON string; the string
  form needs a ``fromjson`` filter, which :func:`render_chat` provides (the
  ``transformers`` environment does not, so pass dicts there, as its docs ask).
* The template only uses ``{%- -%}`` tags, so its output does not depend on the
  ``trim_blocks``/``lstrip_blocks`` settings; :func:`render_chat` nevertheless mirrors
  the ``transformers`` sandbox (same ``tojson``, ``raise_exception``, ``strftime_now``)
  so both render byte-identical strings.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

CHAT_TEMPLATE = r"""
{#- ---- options ---------------------------------------------------------------- -#}
{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}
{%- set truncate_history_thinking = truncate_history_thinking if truncate_history_thinking is defined else true -%}

{#- ---- helpers ---------------------------------------------------------------- -#}
{%- macro render_content(content) -%}
    {%- if content is none -%}
    {%- elif content is string -%}{{- content -}}
    {%- elif content is mapping -%}{{- content | tojson -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part is string -%}{{- part -}}
            {%- elif part is mapping and part.text is defined -%}{{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}

{%- macro render_value(value) -%}
    {%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}
{%- endmacro -%}

{%- macro render_tool(tool) -%}
    {%- set fn = tool.function if tool.function is defined else tool -%}
    {%- set params = fn.parameters if fn.parameters is mapping else {} -%}
    {{- '\n<function>\n<name>' ~ fn.name ~ '</name>' -}}
    {%- if fn.description is string and fn.description | trim -%}
        {{- '\n<description>' ~ (fn.description | trim) ~ '</description>' -}}
    {%- endif -%}
    {{- '\n<parameters>' -}}
    {%- if params.properties is mapping -%}
        {%- for name, schema in params.properties | items -%}
            {{- '\n<parameter>\n<name>' ~ name ~ '</name>' -}}
            {%- for key, value in (schema if schema is mapping else {}) | items -%}
                {%- set shown = value | trim if key == 'description' and value is string else render_value(value) -%}
                {{- '\n<' ~ key ~ '>' ~ shown ~ '</' ~ key ~ '>' -}}
            {%- endfor -%}
            {{- '\n</parameter>' -}}
        {%- endfor -%}
    {%- endif -%}
    {%- if params.required is defined -%}
        {{- '\n<required>' ~ (params.required | tojson) ~ '</required>' -}}
    {%- endif -%}
    {{- '\n</parameters>\n</function>' -}}
{%- endmacro -%}

{%- macro render_tool_call(call) -%}
    {%- set fn = call.function if call.function is defined else call -%}
    {%- set args = fn.arguments if fn.arguments is defined and fn.arguments is not none else {} -%}
    {%- if args is string -%}
        {%- if 'fromjson' is filter -%}
            {%- set args = args | fromjson if args | trim else {} -%}
        {%- else -%}
            {{- raise_exception('tool_call arguments must be a dict (JSON strings need a fromjson filter)') -}}
        {%- endif -%}
    {%- endif -%}
    {{- '<tool_call>\n<function=' ~ fn.name ~ '>\n' -}}
    {%- for name, value in args | items -%}
        {{- '<parameter=' ~ name ~ '>\n' ~ render_value(value) ~ '\n</parameter>\n' -}}
    {%- endfor -%}
    {{- '</function>\n</tool_call>\n' -}}
{%- endmacro -%}

{#- ---- system turn (always emitted) + tool catalogue --------------------------- -#}
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_message = render_content(messages[0].content) -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' ~ system_message -}}
{%- if tools -%}
    {%- if system_message -%}{{- '\n\n' -}}{%- endif -%}
    {{- '# Tools\n\nYou have access to the following functions:\n\n<tools>' -}}
    {%- for tool in tools -%}{{- render_tool(tool) -}}{%- endfor -%}
    {{- '\n</tools>\n\n' -}}
    {{- 'If you choose to call a function ONLY reply in the following format with NO suffix:\n\n'
        '<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n'
        '<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n'
        '</parameter>\n</function>\n</tool_call>\n\n'
        '<IMPORTANT>\nReminder:\n'
        '- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n'
        '- Required parameters MUST be specified\n'
        '- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n'
        '- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n'
        '</IMPORTANT>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}

{#- ---- conversation ----------------------------------------------------------- -#}
{%- set ns = namespace(last_user = -1) -%}
{%- for message in loop_messages -%}
    {%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}

{%- for message in loop_messages -%}
    {%- set content = render_content(message.content) -%}
    {%- if message.role == 'assistant' -%}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' -%}
        {%- if '</think>' in content -%}
            {%- if not reasoning | trim -%}
                {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
            {%- endif -%}
            {%- set content = content.split('</think>')[-1] -%}
        {%- endif -%}
        {%- set keep_reasoning = not (truncate_history_thinking and loop.index0 < ns.last_user) -%}
        {%- if keep_reasoning and reasoning | trim -%}
            {%- set body = '<think>\n' ~ (reasoning | trim) ~ '\n</think>\n' ~ (content | trim) -%}
        {%- else -%}
            {%- set body = '<think></think>' ~ (content | trim) -%}
        {%- endif -%}
        {{- '<|im_start|>assistant\n' ~ (body | trim) -}}
        {%- if message.tool_calls -%}
            {{- '\n' -}}
            {%- for call in message.tool_calls -%}{{- render_tool_call(call) -}}{%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user\n' -}}{%- endif -%}
        {{- '<tool_response>\n' ~ content ~ '\n</tool_response>\n' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' ~ message.role ~ '\n' ~ content ~ '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' ~ ('<think>\n' if enable_thinking else '<think></think>') -}}
{%- endif -%}
""".strip()

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

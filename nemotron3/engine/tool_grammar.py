"""Lark grammars (llguidance) for Nemotron 3's XML tool calls, so a call cannot miss:

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

`call_grammar(tools, ...)` builds the grammar of one or more calls. Design decisions:

* The function name is always one of the declared tools. A tool's parameters are constrained to its JSON
  schema when `strict` (tool_choice required / named, or the tool's own `strict`): the schema's property
  names, in the schema's order, every required one present, no others; values spelled the way the chat
  template renders them and the parser (`chat/parsers.py`, `convert_value`) reads them back: strings raw
  (an `enum` as its literal alternatives, `maxLength`/`minLength` as counts), everything else as JSON
  embedded with llguidance's `%json` (integers, numbers, booleans, null, objects and arrays by their schema).
  A loose tool takes any parameter names and raw values.
* A raw value may not contain `</` or `<p` (so the parser's tag search cannot end it early), one with a
  length bound no `<` at all; the value
  and its closing `\\n</parameter>\\n` are one lexeme, so where the value ends is never ambiguous.
* `<tool_call>` / `</tool_call>` are special tokens, written `<[id]>`. With `triggered=True` the grammar is
  the text after `<tool_call>` (grammar.py's trigger: free text, then a constrained call once the model
  opens one); otherwise it is the whole answer (forced calls, separated by the template's newline, after the
  newline the template puts between `</think>` and a call).
"""
from __future__ import annotations

import json
import re

from ..chat.parsers import schema_type
from .grammar import JSON_OPTIONS

_RAW = r"(?:[^<]|<[^/p])"                    # raw-value characters (see above)
_CLOSE = r"\n</parameter>\n"              # as a regex; as text: _CLOSE_TEXT
_CLOSE_TEXT = "\n</parameter>\n"
_LOOSE_NAME = r"[A-Za-z0-9_.:\-]+"
_JSON_TYPES = ("integer", "number", "boolean", "null", "object", "array")


class ToolGrammarError(ValueError):
    """A tool schema the call grammar cannot express."""


def _lit(s: str) -> str:
    return json.dumps(s)


def _regex(r: str) -> str:
    return "/" + r.replace("/", "\\/") + "/"


def _raw_value(schema: dict) -> str:
    """A string parameter's value + closing tag, as one regex lexeme (or an alternation of literals)."""
    if "enum" in schema or "const" in schema:
        opts = schema["enum"] if "enum" in schema else [schema["const"]]
        if not opts or not all(isinstance(o, str) and not re.search(r"</|<p", o) for o in opts):
            raise ToolGrammarError("a string enum must list strings without '</' or '<p'")
        return "(" + " | ".join(_lit(o + _CLOSE_TEXT) for o in opts) + ")"
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if not lo and hi is None:
        return _regex(_RAW + "*" + _CLOSE)
    return _regex("[^<]{%d,%s}" % (lo, "" if hi is None else hi) + _CLOSE)     # counted: one character each


def _value(schema) -> str:
    if not isinstance(schema, dict):
        return _regex(_RAW + "*" + _CLOSE)
    typ, nullable = schema_type(schema)
    if typ in _JSON_TYPES and ("type" in schema or "anyOf" in schema or "oneOf" in schema):
        return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}) + " " + _lit(_CLOSE_TEXT)
    if nullable:
        return "(" + _raw_value(schema) + " | " + _lit("null" + _CLOSE_TEXT) + ")"
    return _raw_value(schema)


def _params(name: str, fn: dict, strict: bool, rules: list[str]) -> str:
    """The rule for one tool's parameters (appends its sub-rules to `rules`)."""
    schema = fn.get("parameters") or fn.get("input_schema") or {}
    props = schema.get("properties") or {}
    if not strict:
        loose = _regex(_LOOSE_NAME + r">\n" + _RAW + "*" + _CLOSE)
        rules.append(f'{name}: ("<parameter=" {loose})*')
        return name
    required = schema.get("required") or []
    missing = [r for r in required if r not in props]
    if missing:
        raise ToolGrammarError(f"required parameter {missing[0]!r} is not in properties")
    parts = []
    for i, (key, sub) in enumerate(props.items()):
        if not re.fullmatch(_LOOSE_NAME, key):
            raise ToolGrammarError(f"parameter name {key!r} must match [A-Za-z0-9_.:-]+")
        rule = f"{name}_{i}"
        rules.append(f"{rule}: {_lit('<parameter=' + key + '>' + chr(10))} {_value(sub)}")
        parts.append(rule if key in required else rule + "?")
    rules.append(f"{name}: " + (" ".join(parts) if parts else '""'))
    return name


def call_grammar(tools: list[dict], call_open: int, call_close: int, *, names: list[str] | None = None,
                 strict: bool = True, triggered: bool = False, parallel: bool = True) -> str:
    """The Lark grammar of calls to `tools` (OpenAI `{"type": "function", "function": {...}}` or flat
    Anthropic `{name, input_schema}` dicts). `names`: the tools allowed (default all); `strict`: constrain
    every tool's parameters (otherwise only the tools marked `strict`); `call_open` / `call_close`: the
    `<tool_call>` / `</tool_call>` token ids."""
    fns = [t.get("function", t) for t in tools]
    fns = [f for f in fns if names is None or f.get("name") in names]
    if not fns:
        raise ToolGrammarError("no tools to call")
    rules, alts = [], []
    for i, fn in enumerate(fns):
        body = _params(f"args{i}", fn, strict or bool(fn.get("strict")), rules)
        alts.append(f"{_lit(fn['name'] + '>' + chr(10))} {body}")
    rules.append("fn: " + " | ".join(alts))
    body = f'"\\n<function=" fn "</function>\\n" <[{call_close}]>'
    if triggered:
        start = f"start: {body}"
    else:
        rules.append(f"call: <[{call_open}]> {body}")
        # the template writes `</think>\n<tool_call>`: the answer may open with that newline
        start = 'start: "\\n"? call ("\\n" call)*' if parallel else 'start: "\\n"? call'
    return "\n".join([start] + rules) + "\n"

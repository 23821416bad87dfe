"""Grammar-constrained decoding (structured outputs) with llguidance.

`SamplingParams(structured_outputs=StructuredOutputs(json=schema))` (vLLM's `StructuredOutputsParams`:
exactly one of `json`, `json_object`, `regex`, `choice`, `grammar`) makes every answer token one the
grammar allows, so the output parses whatever the model's weights. Design decisions:

* **llguidance** (bench/grammar.py, README "Structured outputs"): masks are computed lazily from the token
  trie for the one parser state at hand, which costs microseconds per token on an 8K or a 131K vocabulary
  and needs no per-grammar precompilation; it takes the tokenizer as bytes (`tokenizers` JSON), rolls back
  tokens (speculation) and embeds JSON schemas inside Lark grammars (`%json`, used by tool_grammar.py).
  It is imported only when a request carries a grammar.
* **One matcher per sequence** (`GrammarState`), advanced by every accepted answer token. The mask applies
  to the answer only: while the model thinks (inside `<think>`) it is unconstrained, and the grammar starts
  at the token after `</think>` (the stop tokens are banned while it thinks: a constrained answer must
  follow). The end-of-sequence tokens are allowed exactly when the grammar accepts.
* **Speculation**: the mask for a position after draft tokens is computed by consuming the drafts, then
  rolling them back; a draft the grammar rejects gets probability 0 in the target, so it is never accepted.
* **Triggered grammars** (`trigger`: a token id): the output is free until the model emits the trigger
  token, then follows the grammar until it completes, then is free again, thinking included (tool calls
  under tool_choice auto: once `<tool_call>` starts the call must name a declared tool, and the parser takes
  a call inside reasoning as a call).
* `max_tokens` can cut an answer short: as in vLLM the finish_reason is `length` and the text may be
  incomplete; everything that finishes with `stop` is complete.
"""
from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# json_object: any JSON object (OpenAI's JSON mode)
_ANY_OBJECT = {"type": "object"}
# JSON as json.dumps writes it: no free whitespace, so a model cannot pad an answer with blanks until max_tokens
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutputs:
    """What the answer must match (set exactly one). `json`: a JSON schema (dict or JSON text);
    `json_object`: any JSON object; `regex`; `choice`: one of these strings; `grammar`: an llguidance Lark
    grammar. `trigger`: the grammar starts after each occurrence of this token id (free text elsewhere)."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    trigger: int | None = None

    def __post_init__(self):
        set_ = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"SamplingParams.structured_outputs must set exactly one of {', '.join(_KINDS)}, "
                             f"got {set_ or 'none'}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("SamplingParams.structured_outputs choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))

    def source(self) -> str:
        """The llguidance grammar (raises ValueError on a malformed schema)."""
        import llguidance as L
        if self.json is not None or self.json_object:
            schema = _ANY_OBJECT if self.json_object else self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("the JSON schema must be a JSON object")
            return L.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if self.regex is not None:
            return L.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return L.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return L.LLMatcher.grammar_from_lark(self.grammar)


class Grammars:
    """The engine's llguidance tokenizer (built on first use: ~0.1 s at 8K tokens) and an LRU of checked
    grammars. `vocab_size`: the model's (rows of the logits; tokens past the tokenizer are never allowed)."""

    def __init__(self, backend_tokenizer, vocab_size: int, eos_ids: Sequence[int], max_cached: int = 256):
        self._backend, self.vocab_size, self.eos_ids = backend_tokenizer, vocab_size, sorted(eos_ids)
        self._tok = None
        self._cache: OrderedDict[str, str] = OrderedDict()     # the spec as JSON -> its checked grammar
        self.max_cached = max_cached

    @property
    def tokenizer(self):
        if self._tok is None:
            import llguidance as L
            self._tok = L.LLTokenizer(self._backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_ids)
        return self._tok

    def compile(self, spec: StructuredOutputs) -> str:
        """The checked grammar of `spec`; ValueError with llguidance's message when it is invalid or uses
        an unsupported feature."""
        key = json.dumps(dataclasses.asdict(spec), sort_keys=True)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        import llguidance as L
        try:
            g = spec.source()
        except ValueError as e:
            raise ValueError(f"invalid structured output: {e}") from None
        err = L.LLMatcher.validate_grammar(g, self.tokenizer)
        if err:
            raise ValueError(f"invalid structured output: {err}")
        self._cache[key] = g
        if len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return g

    def state(self, spec: StructuredOutputs) -> "GrammarState":
        return GrammarState(self, self.compile(spec), spec.trigger)


def mask_of(matcher) -> torch.Tensor:
    """The matcher's next-token mask as bool [vocab]. llguidance's one-byte-per-token form: 9x cheaper on the CPU
    than its bitmask unpacked in torch (8.7 vs 78 us at 8K tokens; bench/RESULTS.md)."""
    return torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8).bool()


class GrammarState:
    """One sequence's matcher over its answer tokens. `allowed(extra)` is the mask for the position after
    the consumed tokens plus `extra` (speculative drafts), None where the grammar does not constrain;
    `advance(token)` consumes an accepted token."""

    def __init__(self, grammars: Grammars, grammar: str, trigger: int | None):
        import llguidance as L
        self.g, self.grammar, self.trigger = grammars, grammar, trigger
        self.matcher = L.LLMatcher(grammars.tokenizer, grammar)
        self.active = trigger is None          # a triggered grammar waits for its token
        self.failed = False                    # a token the grammar refused was forced in (never sampled)

    def advance(self, token: int) -> None:
        if self.failed:
            return
        if not self.active:
            if token == self.trigger:
                self.matcher.reset()
                self.active = True
            return
        if not self.matcher.consume_token(token):
            self.failed = True
        elif self.trigger is not None and self.matcher.is_stopped():
            self.active = False

    def allowed(self, extra: Sequence[int] = ()) -> torch.Tensor | None:
        if self.failed:
            return None
        active, m, n = self.active, self.matcher, 0
        for t in extra:                        # walk the drafts; the live matcher is rolled back after
            if not active:
                if t == self.trigger:
                    import llguidance as L
                    active, m = True, L.LLMatcher(self.g.tokenizer, self.grammar)
                continue
            if m.try_consume_tokens([t]) != 1:
                active = None                  # a refused draft: no later position can be kept, any mask does
                break
            n += m is self.matcher
            if self.trigger is not None and m.is_stopped():
                active = False
        mask = mask_of(m) if active else None
        if n:
            self.matcher.rollback(n)
        return mask

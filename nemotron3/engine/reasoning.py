"""Reasoning control: per-request thinking budgets and the `off` / `regular` / `medium` modes.

A `ThinkingBudget` follows one sequence token by token. It knows whether the sequence is inside a
`<think>` block (from the prompt: the chat template's generation prompt opens one when thinking is on),
counts the tokens generated inside it (`reasoning_tokens`, reported in the request metrics) and, once
`budget` tokens have been spent, forces `</think>` as the next token. As NVIDIA's NIM
`BudgetControlLogitsProcessor` does, it first lets the model finish the current line: the end is forced
right after a token containing a newline, or after a grace of ceil(10% of the budget) more tokens,
whichever comes first.

Modes (`SamplingParams.reasoning_mode`):

* `off`: thinking disabled. `LLM.chat` renders the prompt with `enable_thinking=False`, which ends it with
  an empty `<think></think>`; nothing needs forcing, and `<think>` is banned so the model cannot open a
  new block.
* `regular`: no budget unless the request sets `thinking_budget`.
* `medium`: `thinking_budget` if given, else `MEDIUM_THINKING_BUDGET` = 1024 tokens, and never more than
  half of the request's `max_tokens` (so the answer always has room: "thinking eats max_tokens" is a
  common complaint with Nemotron 3 deployments). Why 1024: the Ultra report's medium-effort mode spends
  ~2.5x fewer tokens than regular for ~7% lower accuracy, and our small models' regular traces are a few
  hundred to a few thousand tokens; 1024 (+10% grace) cuts the long tail to that ratio while leaving
  ordinary questions untouched, and keeps a full trace + answer inside the 4K context of `models/pico`.
  The engine's `medium_thinking_budget` argument changes it.

The state machine is deterministic in the token history, so speculative decoding copies it to walk
through draft tokens (`copy()`), and the forced token is part of the target distribution (a forced
position accepts a matching draft with probability 1 and rejects any other).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable

from .sampling import RowConstraint

MEDIUM_THINKING_BUDGET = 1024
GRACE_FRACTION = 0.1


@dataclass(frozen=True)
class ReasoningTokens:
    """Token ids the budget needs: the think delimiters and every token whose text contains a newline."""
    think_start: int
    think_end: int
    newline_ids: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tok) -> "ReasoningTokens | None":
        start, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
        if start is None or end is None:
            return None
        vocab = len(tok) if hasattr(tok, "__len__") else tok.vocab_size
        newline = frozenset(i for i in range(vocab) if "\n" in tok.decode([i]))
        return cls(start, end, newline)


def effective_budget(mode: str, budget: int | None, max_tokens: int | None,
                     medium_default: int = MEDIUM_THINKING_BUDGET) -> int | None:
    """The number of thinking tokens allowed before `</think>` is forced (None: unlimited)."""
    if mode == "medium":
        b = medium_default if budget is None else budget
        return b if max_tokens is None else min(b, max_tokens // 2)
    if mode == "off":
        return 0 if budget is None else budget
    return budget


class ThinkingBudget:
    def __init__(self, tokens: ReasoningTokens, budget: int | None, mode: str = "regular",
                 prompt_ids: Iterable[int] = ()):
        self.tokens, self.budget, self.mode = tokens, budget, mode
        self.grace = 0 if budget is None else math.ceil(GRACE_FRACTION * budget)
        last_start = last_end = -1
        for i, t in enumerate(prompt_ids):
            if t == tokens.think_start:
                last_start = i
            elif t == tokens.think_end:
                last_end = i
        self.inside = last_start > last_end
        self.count = 0                 # reasoning tokens so far (all think blocks together)
        self.line_start = True         # the last token ended a line (or thinking just opened)
        self.forced_end = False        # a `</think>` was forced at least once

    def copy(self) -> "ThinkingBudget":
        return copy.copy(self)

    def forced(self) -> int | None:
        """Token the next position must be, if any."""
        if not self.inside or self.budget is None or self.count < self.budget:
            return None
        if self.line_start or self.count >= self.budget + self.grace:
            return self.tokens.think_end
        return None

    def constraint(self) -> RowConstraint | None:
        f = self.forced()
        if f is not None:
            return RowConstraint(forced=f)
        if self.mode == "off" and not self.inside:
            return RowConstraint(banned=(self.tokens.think_start,))
        return None

    def advance(self, token: int) -> None:
        t = self.tokens
        if self.inside:
            if token == t.think_end:
                self.inside = False
                if self.budget is not None and self.count >= self.budget:
                    self.forced_end = True
            else:
                self.count += 1
                self.line_start = token in t.newline_ids
        elif token == t.think_start:
            self.inside, self.line_start = True, True

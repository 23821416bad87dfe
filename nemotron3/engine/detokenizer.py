"""Incremental detokenisation of one sequence, its stop strings, and the part of its text that may be streamed.

Design decisions:

* **vLLM's prefix/read offsets over `tokenizer.decode`.** Each new token decodes a short window (a few tokens of
  context + the unread tail) twice and keeps the difference; text ending in U+FFFD (a UTF-8 sequence cut between
  tokens) is held back until the next token completes it. It works for any tokenizer with `decode` (ours and
  `transformers`'), with `skip_special_tokens` either way. `tokenizers`' Rust `DecodeStream` was measured against
  it on pico (bench/detokenize.py, bench/RESULTS.md): it is not faster per token at this vocabulary and would
  need a second path for `transformers` tokenizers, so it is not used.
* **Stop strings** count only where they end in text added by the latest token (vLLM), so a stop string is
  found once, at its earliest position; the text is cut before it (or after it, `include_stop_str_in_output`).
* **Hold-back.** While a sequence runs, the last `max(len(stop)) - 1` characters are not streamed: they may be
  the start of a stop string that the next token completes and that must then not have been sent.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

CONTEXT_TOKENS = 4          # prompt tokens kept as decoding context for the first generated tokens


class Detokenizer:
    """Text of one sequence's output ids, built a token at a time (`push`), with stop strings (`find_stop`)
    and what may be streamed (`emit`)."""

    def __init__(self, tokenizer, prompt_ids: Seq[int], skip_special_tokens: bool, stop: Seq[str] = (),
                 include_stop: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.stop, self.include_stop = list(stop), include_stop
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        context = prompt_ids[-CONTEXT_TOKENS:]
        self.ids = list(context)                # context + output tokens
        self.prefix_offset, self.read_offset = 0, len(context)
        self.text = ""
        self.sent = 0                           # characters of `text` already streamed

    def push(self, token: int) -> int:
        """Add one token; returns how many characters the text grew by (0 while a UTF-8 sequence is open)."""
        ids = self.ids
        ids.append(token)
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full = self.tokenizer.decode(ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return len(full) - len(prefix)
        return 0

    def find_stop(self, new_from: int) -> str | None:
        """The earliest stop string ending in the text added since `new_from`; cuts the text there."""
        start = max(0, new_from - self.hold)
        hit = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (hit is None or i < hit[0]):
                hit = (i, s)
        if hit is None:
            return None
        i, s = hit
        self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
        return s

    def emit(self, finished: bool) -> tuple[str, str]:
        """(the text that may be shown now, the part of it not streamed before): all of it once finished,
        less a possible stop-string prefix while the sequence runs."""
        end = len(self.text)
        if self.stop and not finished:
            end = max(self.sent, end - self.hold)
        start, self.sent = self.sent, end
        return self.text[:end], self.text[start:end]

"""Incremental detokenisation of one sequence, its stop strings, and the part of its text that may be streamed.

Design decisions:

* **`tokenizers`' `DecodeStream`** turns one token at a time into text, in Rust: it decodes a short window
  (a few prompt tokens of context, then the unread tail) and holds back a UTF-8 sequence cut between tokens
  until the next token completes it. Measured against vLLM's prefix/read offsets over `tokenizer.decode`
  (two Python-level decodes per token) on pico: 2.2 vs 18.2 us/token, the same text (bench/detokenize.py,
  bench/RESULTS.md), i.e. ~1 ms less per step at 64 sequences. It needs the Rust tokenizer
  (`backend_tokenizer`: ours and every `transformers` fast tokenizer have one).
* **Stop strings** count only where they end in text added by the latest token (vLLM), so a stop string is
  found once, at its earliest position; the text is cut before it (or after it, `include_stop_str_in_output`).
* **Hold-back.** While a sequence runs, the last `max(len(stop)) - 1` characters are not streamed: they may be
  the start of a stop string that the next token completes and that must then not have been sent.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

from tokenizers.decoders import DecodeStream

CONTEXT_TOKENS = 4          # prompt tokens kept as decoding context for the first generated tokens


class Detokenizer:
    """Text of one sequence's output ids, built a token at a time (`push`), with stop strings (`find_stop`)
    and what may be streamed (`emit`). `backend`: a `tokenizers.Tokenizer`."""

    def __init__(self, backend, prompt_ids: Seq[int], skip_special_tokens: bool, stop: Seq[str] = (),
                 include_stop: bool = False):
        self.backend = backend
        self.stream = DecodeStream(list(prompt_ids[-CONTEXT_TOKENS:]), skip_special_tokens=skip_special_tokens)
        self.stop, self.include_stop = list(stop), include_stop
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0                           # characters of `text` already streamed

    def push(self, token: int) -> int:
        """Add one token; returns how many characters the text grew by (0 while a UTF-8 sequence is open)."""
        new = self.stream.step(self.backend, token)
        if not new:
            return 0
        self.text += new
        return len(new)

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

"""Incremental detokenisation per generated token: vLLM's prefix/read offsets over `tokenizer.decode` (the
engine's approach until this measurement) against `tokenizers`' Rust `DecodeStream` (the engine's `Detokenizer`
now), on the pico tokenizer.

    python bench/detokenize.py [--tokens 1024] [--sequences 16] [--repeats 5]

Streams the token ids of real text (the README and the chat template, cut into sequences) one at a time
through both, checks they build the same text, and prints microseconds per token (median of the repeats).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nemotron3.engine.detokenizer import Detokenizer  # noqa: E402
from nemotron3.tokenizer import load_tokenizer  # noqa: E402


class _Offsets:
    """vLLM's incremental detokenisation: decode the window twice per token, keep the difference."""

    def __init__(self, tok, context, skip):
        self.tok, self.skip, self.ids, self.prefix_offset, self.read_offset = tok, skip, list(context), 0, len(context)
        self.text = ""

    def push(self, t):
        self.ids.append(t)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)


def offsets(tok, ids, skip):
    d = _Offsets(tok, ids[:4], skip)
    for t in ids[4:]:
        d.push(t)
    return d.text


def stream(tok, ids, skip):
    d = Detokenizer(tok.backend_tokenizer, ids[:4], skip)
    for t in ids[4:]:
        d.push(t)
    return d.text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tok = load_tokenizer(ROOT / "models" / "pico")
    text = (ROOT / "README.md").read_text() + (ROOT / "nemotron3" / "chat" / "template.py").read_text()
    ids = tok.encode(text)
    seqs = [ids[i:i + args.tokens] for i in range(0, args.tokens * args.sequences, args.tokens)]
    assert len(seqs[-1]) == args.tokens, "not enough text for that many tokens"
    n = sum(len(s) - 4 for s in seqs)
    for skip in (False, True):
        same = all(offsets(tok, s, skip) == stream(tok, s, skip) for s in seqs)
        res = {}
        for name, fn in (("prefix/read offsets (decode x2/token)", offsets), ("DecodeStream (Detokenizer)", stream)):
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                for s in seqs:
                    fn(tok, s, skip)
                times.append(time.perf_counter() - t)
            res[name] = statistics.median(times) / n * 1e6
        print(f"skip_special_tokens={skip}: {len(seqs)} sequences x {args.tokens} tokens, same text: {same}")
        for name, us in res.items():
            print(f"  {name:<36} {us:6.2f} us/token")


if __name__ == "__main__":
    main()

"""Synthetic long-range retrieval rows for the long-context stage (recipes.md §3: Nemotron 3 adds synthetic
retrieval data to its long-context phase).

Each row of `length` tokens is one document: an intro, corpus lines (the **train** split; RULER's haystack is
the val split) with 1-6 key/value needles of one kind ("the access code for bold-otter is 48213") planted at
random depths (one at the very start in a fifth of the rows), then 1-3 questions that restate a key, each
followed by its value. Only the answer tokens (the value and its period) carry loss: the haystack is text the
base already models, and at pico scale an unmasked document puts <1% of its loss on the retrieval itself.
Several needles of the same kind make the model match the key, not the kind. The wordings are ours and
differ from RULER's evaluation prompts ("special magic number"), so RULER measures transfer.
Keys and values come from the RULER generators (`eval/ruler.random_key`, `random_value`).
"""
from __future__ import annotations

import random

import numpy as np

from ..eval.ruler import Haystack, random_key, random_value

KINDS = ("access code", "secret code", "hidden value", "lucky number", "pass number", "serial number",
         "room number", "ticket number", "order number", "account id", "lock combination", "password",
         "locker number", "tracking number", "pin", "reference number")
INTROS = ("Remember the {kind}s in the text below.\n\n",
          "The following text hides some {kind}s. Keep them in mind.\n\n",
          "Read carefully: a few {kind}s appear somewhere in this document.\n\n",
          "")
# (needle statement, question ending where the value comes next)
STYLES = (("The {kind} for {k} is {v}.", "Question: what is the {kind} for {k}? Answer: The {kind} for {k} is"),
          ("Note that the {kind} of {k} is {v}.", "Q: which {kind} belongs to {k}? A: the {kind} of {k} is"),
          ("{k}: the {kind} is {v}.", "Tell me the {kind} of {k}.\n{k}: the {kind} is"),
          ("Remember: {k} has {kind} {v}.", "What {kind} does {k} have? {k} has {kind}"),
          ("The {kind} that goes with {k} is {v}.", "Which {kind} goes with {k}? The {kind} that goes with {k} is"))


def retrieval_row(rng: random.Random, length: int, tokenizer, hay: Haystack) -> tuple[list[int], list[int]]:
    """(ids, mask) of one document of exactly `length` tokens (the last is EOS); mask 1 = learn this token."""
    enc = lambda s: tokenizer.encode(s, parse_special=False)           # noqa: E731
    kind = rng.choice(KINDS)
    stmt, ask = rng.choice(STYLES)
    keys, vals = set(), set()
    pairs = [(random_key(rng, keys), random_value(rng, vals)) for _ in range(rng.randint(1, 6))]
    intro = enc(rng.choice(INTROS).format(kind=kind))
    needles = [enc(stmt.format(kind=kind, k=k, v=v) + "\n") for k, v in pairs]
    asked = rng.sample(pairs, rng.randint(1, min(3, len(pairs))))
    qa = [(enc("\n" + ask.format(kind=kind, k=k)), enc(f" {v}.")) for k, v in asked]
    fixed = len(intro) + sum(map(len, needles)) + sum(len(q) + len(a) for q, a in qa) + 1
    if fixed + 16 > length:
        raise ValueError(f"retrieval rows need more than {fixed + 16} tokens, got length {length}")
    lines = [ids for _, ids in hay.take(length - fixed, rng)]
    # needle slots: line boundaries 0..len(lines), one at the start in a fifth of the documents
    slots = sorted(rng.randint(0, len(lines)) for _ in needles)
    if rng.random() < 0.2:
        slots[0] = 0
    ids, mask = list(intro), [0] * len(intro)
    order = list(range(len(needles)))
    rng.shuffle(order)
    k = 0
    for j in range(len(lines) + 1):
        while k < len(slots) and slots[k] == j:
            ids += needles[order[k]]
            k += 1
        if j < len(lines):
            ids += lines[j]
    mask += [0] * (len(ids) - len(mask))
    for q, a in qa:
        ids += q + a
        mask += [0] * len(q) + [1] * len(a)
    ids, mask = ids[:length - 1] + [tokenizer.eos_id], mask[:length - 1] + [0]
    return ids, mask


def retrieval_rows(n: int, length: int, tokenizer, haystack, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` rows of `length` tokens as one stream for `data.PackedDataset` (row i at [i * length, (i+1) * length],
    one trailing pad): (tokens int32 [n * length + 1], mask uint8, same shape). Deterministic in
    (seed, length, i); `haystack` is a `Haystack` or a list of texts."""
    hay = haystack if isinstance(haystack, Haystack) else Haystack(list(haystack), tokenizer)
    tokens = np.full(n * length + 1, tokenizer.pad_id, dtype=np.int32)
    mask = np.zeros(n * length + 1, dtype=np.uint8)
    for i in range(n):
        ids, m = retrieval_row(random.Random(f"retrieval/{seed}/{length}/{i}"), length, tokenizer, hay)
        tokens[i * length:i * length + len(ids)] = ids
        mask[i * length:i * length + len(m)] = m
    return tokens, mask

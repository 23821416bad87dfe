"""Packed fixed-length training batches from a tokenized corpus.

Design decisions:

* Documents are encoded with control-token strings treated as plain text, EOS is
  appended to each, and everything is concatenated into one token stream (cached as
  ``<split>.tokens-<key>.npy`` next to the ``.jsonl``; uint16 when the vocab fits,
  loaded without pickle; ``key`` hashes the corpus bytes and the tokenizer).
* Row ``i`` is ``stream[i*T : i*T + T + 1]`` (stride ``T``, so consecutive rows share one
  boundary token and every token after the first is a target exactly once);
  ``input_ids = row[:-1]``, ``labels = row[1:]``. A label is ``-100`` where the input
  token is EOS, i.e. where the target would be the first token of the next document:
  no cross-document prediction (attention may still see the previous document). An optional
  ``loss_mask`` stream (SFT: 1 on assistant tokens) also sets ``-100`` where the target's mask is 0.
* Batch ``k`` is a pure function of ``(seed, k, batch_size, world_size, rank)``: epoch
  ``e`` uses the permutation ``default_rng([seed, e])``, each step consumes
  ``batch_size * world_size`` consecutive permuted rows (rank ``r`` takes the ``r``-th
  slice), and the ragged tail of each epoch is dropped. Hence ``batches(start_step=k)``
  reproduces an uninterrupted run exactly and ranks never share a row within a step.
* A ``Mixture`` of datasets with different row lengths and batch sizes (the long-context stage mixes
  long and short sequences, as Nemotron 3 mixes 1M- and 4K-token sequences) assigns global step ``k``
  to one component by a fixed weighted cycle; the component's own step counter is the number of
  earlier steps it was given, so a mixture batch is again a pure function of ``k``.
* A recipe's ``data`` section becomes datasets here (``prepare_data``, ``build_component``): every trainer that
  reads packed text (pretraining, long-context, SFT) builds its batches the same way.
"""

from __future__ import annotations

import hashlib
import os
from itertools import count
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..eval.lm import IGNORE
from ..tokenizer import load_tokenizer, train_tokenizer
from .corpus import build_corpus, iter_documents, stdlib_root


def tokenize_documents(texts, tokenizer, chunk: int = 64) -> np.ndarray:
    """Concatenate ``encode(text) + [eos]`` for every text into one 1-D array."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    parts, buf = [], []

    def flush():
        for ids in tokenizer.encode_batch(buf, parse_special=False):
            parts.append(np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
        buf.clear()

    for text in texts:
        buf.append(text)
        if len(buf) >= chunk:
            flush()
    flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def load_tokens(corpus: str | os.PathLike, tokenizer, split: str = "train", cache: bool = True) -> np.ndarray:
    """Token stream of ``corpus`` (a corpus dir or a ``.jsonl`` file), cached as ``.npy``."""
    path = Path(corpus)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    key = hashlib.sha256(path.read_bytes() + tokenizer.fingerprint.encode()).hexdigest()[:16]
    cache_path = path.with_name(f"{path.stem}.tokens-{key}.npy")
    if cache and cache_path.exists():
        return np.load(cache_path, allow_pickle=False)
    tokens = tokenize_documents((d["text"] for d in iter_documents(path)), tokenizer)
    if cache:
        tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, tokens, allow_pickle=False)
        os.replace(tmp, cache_path)
    return tokens


def copy_task_stream(tokens: np.ndarray, rows: int, seq_len: int, seed: int = 0,
                     span_ids: tuple[int, int] | None = None, span_len: tuple[int, int] = (4, 40),
                     filler_len: tuple[int, int] = (0, 80)) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic in-context copying ("induction") data: rows of `seq_len` tokens made of [span A, filler,
    span A again] blocks, spans cut from a real token stream (`tokens`, the corpus), loss only on the repeated
    span after its first token (which is not predictable). Induction heads form after billions of natural-text
    tokens (Olsson et al. 2022); pico sees ~2M, and its base did not copy at all (loss on the second copy of a
    repeated sequence equal to the first), while every environment needs copying from the context (question ->
    tool call -> answer). A data mix adds it as component {"source": "copy", "rows": N, ...}.
    `span_ids=(lo, hi)`: the spans are instead drawn uniformly from ids [lo, hi) (the filler is still text).
    Text spans are a weak signal: their common tokens (indentation, punctuation) recur all over the row, so
    "the token after the previous occurrence" is ambiguous and most of a span is guessable without copying;
    on pico a text-span curriculum had not started copying after 650 copy steps. Random spans make the
    previous occurrence unique and copying the only way to predict them. Span and filler lengths are drawn
    uniformly from [lo, hi) (`span_len`, `filler_len`).
    Returns (tokens, loss mask), both of length rows * seq_len + 1."""
    def is_range(r, lo):
        return (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                     for x in r) and lo <= r[0] < r[1])

    if not (is_range(span_len, 2) and is_range(filler_len, 0)):
        raise ValueError(f"span_len must be [lo, hi) with 2 <= lo < hi and filler_len [lo, hi) with 0 <= lo < hi,"
                         f" got {span_len}, {filler_len}")
    need = 2 * (span_len[1] + filler_len[1])
    if len(tokens) < need:
        raise ValueError(f"the copying curriculum needs a token stream of >= {need} tokens, got {len(tokens)}")
    rng = np.random.default_rng(seed)
    out = np.zeros(rows * seq_len + 1, dtype=np.int32)
    mask = np.zeros(len(out), dtype=np.uint8)
    pos = 0
    while pos < len(out):
        a = int(rng.integers(*span_len))
        f = int(rng.integers(*filler_len))
        start = int(rng.integers(0, len(tokens) - a - f - 1))
        span, filler = tokens[start:start + a], tokens[start + a:start + a + f]
        if span_ids is not None:
            span = rng.integers(span_ids[0], span_ids[1], a).astype(tokens.dtype)
        block = np.concatenate([span, filler, span])
        m = np.zeros(len(block), dtype=np.uint8)
        m[a + f + 1:] = 1
        n = min(len(block), len(out) - pos)
        out[pos:pos + n], mask[pos:pos + n] = block[:n], m[:n]
        pos += n
    return out, mask


class PackedDataset:
    """Rows of ``seq_len + 1`` tokens cut from one token stream; see module docstring."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int, seed: int = 0, shuffle: bool = True,
                 loss_mask: np.ndarray | None = None):
        self.tokens = np.asarray(tokens)
        self.loss_mask = None if loss_mask is None else np.asarray(loss_mask)
        if self.loss_mask is not None and self.loss_mask.shape != self.tokens.shape:
            raise ValueError(f"loss_mask shape {self.loss_mask.shape} != tokens shape {self.tokens.shape}")
        self.seq_len, self.eos_id, self.seed, self.shuffle = int(seq_len), int(eos_id), int(seed), shuffle
        self.num_rows = max(0, (len(self.tokens) - 1) // self.seq_len)
        if self.num_rows == 0:
            raise ValueError(f"{len(self.tokens)} tokens are too few for seq_len={seq_len}")

    @classmethod
    def from_corpus(cls, corpus, tokenizer, seq_len: int, split: str = "train", seed: int = 0,
                    shuffle: bool = True, cache: bool = True) -> "PackedDataset":
        return cls(load_tokens(corpus, tokenizer, split, cache), seq_len, tokenizer.eos_id, seed, shuffle)

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` LongTensors ``[len(idx), seq_len]`` for row indices ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        pos = idx[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        window = self.tokens[pos].astype(np.int64)
        x, y = window[:, :-1], window[:, 1:].copy()
        y[x == self.eos_id] = IGNORE
        if self.loss_mask is not None:
            y[self.loss_mask[pos[:, 1:]] == 0] = IGNORE
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    def _order(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch`` (the last one is memoised)."""
        if getattr(self, "_cached", (None,))[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_rows) if self.shuffle
                     else np.arange(self.num_rows))
            self._cached = (epoch, order)
        return self._cached[1]

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return self.num_rows // (batch_size * world_size)

    def batch_rows(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Row indices of ``rank``'s share of global step ``step``."""
        spe = self.steps_per_epoch(batch_size, world_size)
        if spe == 0:
            raise ValueError(f"{self.num_rows} rows < batch_size*world_size={batch_size * world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        epoch, k = divmod(int(step), spe)
        start = (k * world_size + rank) * batch_size
        return self._order(epoch)[start:start + batch_size]

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        """``(input_ids, labels)``, each ``[batch_size, seq_len]`` int64, for global step ``step``."""
        return self.rows(self.batch_rows(step, batch_size, rank, world_size))

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1,
                num_steps: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (or ``num_steps``-long) stream of batches starting at ``start_step``."""
        steps = count(start_step) if num_steps is None else range(start_step, start_step + num_steps)
        for step in steps:
            yield self.batch(step, batch_size, rank, world_size)

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1):
        """One ordered pass over this rank's rows (``rank::world_size``); last batch may be short."""
        mine = np.arange(rank, self.num_rows, world_size)
        for i in range(0, len(mine), batch_size):
            yield self.rows(mine[i:i + batch_size])


class Mixture:
    """Components ``(dataset, batch_size, weight)``; step ``k`` goes to ``cycle[k % len(cycle)]`` where the
    cycle spreads each component's integer ``weight`` evenly (weights 2:1 -> A B A, A B A, ...)."""

    def __init__(self, components: list[tuple[PackedDataset, int, int]]):
        if not components:
            raise ValueError("a mixture needs at least one component")
        for _, b, w in components:
            if int(b) < 1 or int(w) < 1 or int(w) != w:
                raise ValueError(f"mixture batch_size and weight must be positive integers, got {b}, {w}")
        self.components = [(ds, int(b), int(w)) for ds, b, w in components]
        total = sum(w for *_, w in self.components)
        # component i's j-th slot sits at (j + 0.5) / w_i of the cycle; stable sort keeps it deterministic
        slots = sorted(((j + 0.5) / w, i) for i, (_, _, w) in enumerate(self.components) for j in range(w))
        self.cycle = [i for _, i in slots]
        self.before = [[self.cycle[:p].count(i) for p in range(total)] for i in range(len(self.components))]

    def __len__(self) -> int:
        return sum(len(ds) for ds, *_ in self.components)

    def locate(self, step: int) -> tuple[int, int]:
        """(component index, that component's own step) of global step ``step``."""
        n = len(self.cycle)
        q, r = divmod(int(step), n)
        i = self.cycle[r]
        return i, q * self.components[i][2] + self.before[i][r]

    def batch(self, step: int, rank: int = 0, world_size: int = 1):
        i, k = self.locate(step)
        ds, b, _ = self.components[i]
        return ds.batch(k, b, rank, world_size)

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Global steps until the first component wraps around."""
        n = len(self.cycle)
        return min(ds.steps_per_epoch(b, world_size) * n // w for ds, b, w in self.components)


def build_component(spec: dict, corpus: Path, tok, seed: int, shuffle: bool):
    """One PackedDataset from a data spec: source "corpus" (the recipe's corpus dir) or another corpus dir
    (both read `split`, default train), a documents `.jsonl`, a token stream `.npy` (optionally with a
    `mask` `.npy` of the same length: 1 = learn this token), or "copy": `rows` rows of the in-context copying
    curriculum cut from the corpus (`copy_task_stream`; spans drawn with the spec's `seed`, default the
    training seed; `"spans": "random"` draws the copied spans uniformly from the non-special ids, or from the
    `span_vocab` lowest of them: the most frequent BPE tokens, whose embeddings the text trains; `span_len`
    and `filler_len` are [lo, hi) ranges).
    `"pack": false` (documents only) gives every document a row of its own (cut to seq_len, padded, pad
    targets masked), so a document that must be seen whole (a retrieval document whose questions come at its
    end) never straddles two rows."""
    src, T = spec.get("source", "corpus"), spec["seq_len"]
    if src == "copy":
        if not isinstance(spec.get("rows"), int) or spec["rows"] < 1:
            raise ValueError(f"a 'copy' data component needs \"rows\": a positive integer, got {spec.get('rows')!r}")
        spans = spec.get("spans", "text")
        if spans not in ("text", "random"):
            raise ValueError(f"a 'copy' component's \"spans\" must be 'text' or 'random', got {spans!r}")
        n_ids = spec.get("span_vocab", tok.vocab_size)
        if not isinstance(n_ids, int) or isinstance(n_ids, bool) or n_ids < 2:
            raise ValueError(f"a 'copy' component's \"span_vocab\" must be an integer >= 2, got {n_ids!r}")
        lo = max(tok.special_ids) + 1              # "span_vocab": N draws from the N lowest non-special ids
        span_ids = (lo, min(tok.vocab_size, lo + n_ids)) if spans == "random" else None
        lengths = {k: spec[k] for k in ("span_len", "filler_len") if k in spec}
        tokens, mask = copy_task_stream(load_tokens(corpus, tok), spec["rows"], T, spec.get("seed", seed), span_ids,
                                        **lengths)
        return PackedDataset(tokens, T, tok.eos_id, seed=seed, shuffle=shuffle, loss_mask=mask)
    is_docs = src == "corpus" or Path(src).is_dir() or str(src).endswith(".jsonl")
    if is_docs and spec.get("pack", True) is False:
        path = Path(corpus if src == "corpus" else src)
        path = path / f"{spec.get('split', 'train')}.jsonl" if path.is_dir() else path
        docs = tok.encode_batch([d["text"] for d in iter_documents(path)], parse_special=False)
        tokens = np.full(len(docs) * T + 1, tok.pad_id, dtype=np.int32)
        mask = np.zeros(len(tokens), dtype=np.uint8)
        for i, ids in enumerate(docs):
            ids = ids[:T - 1] + [tok.eos_id]
            tokens[i * T:i * T + len(ids)] = ids
            mask[i * T + 1:i * T + len(ids)] = 1
        return PackedDataset(tokens, T, tok.eos_id, seed=seed, shuffle=shuffle, loss_mask=mask)
    if is_docs:
        tokens = load_tokens(corpus if src == "corpus" else src, tok, spec.get("split", "train"))
    elif str(src).endswith(".npy"):
        tokens = np.load(src, allow_pickle=False)
    else:
        raise ValueError(f"data source must be 'corpus', 'copy', a corpus dir, a .jsonl or a .npy file, got {src!r}")
    mask = np.load(spec["mask"], allow_pickle=False) if spec.get("mask") else None
    return PackedDataset(tokens, T, tok.eos_id, seed=seed, shuffle=shuffle, loss_mask=mask)


def prepare_data(recipe: dict, vocab_size: int):
    """Build the corpus and train the tokenizer when missing; returns (train Mixture, val PackedDataset).
    Without `data.mix` the mixture is the corpus train split alone (rows of seq_len, train.batch_size);
    `data.mix` lists components {source, seq_len, batch_size, weight[, split, mask]}; `data.val` is a spec
    like a component's (default: the corpus val split at seq_len)."""
    d, seed = recipe["data"], recipe["train"]["seed"]
    corpus, tok_dir = Path(d["corpus_dir"]), Path(d["tokenizer_dir"])
    if not (corpus / "train.jsonl").exists():     # "stdlib/NAME" sources: a file or package of the stdlib
        sources = None if d["sources"] is None else [
            str(stdlib_root() / s[len("stdlib/"):]) if s.startswith("stdlib/") else s for s in d["sources"]]
        build_corpus(corpus, sources=sources)
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer((doc["text"] for doc in iter_documents(corpus)), vocab_size, tok_dir)
    tok = load_tokenizer(tok_dir)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer vocab {tok.vocab_size} > model vocab_size {vocab_size}")
    mix = d.get("mix") or [{"source": "corpus", "seq_len": d["seq_len"], "batch_size": recipe["train"]["batch_size"]}]
    train = Mixture([(build_component(c, corpus, tok, seed, True), c.get("batch_size", recipe["train"]["batch_size"]),
                      c.get("weight", 1)) for c in mix])
    val = build_component({"source": "corpus", "split": "val", "seq_len": d["seq_len"], **(d.get("val") or {})},
                          corpus, tok, seed, False)
    return train, val

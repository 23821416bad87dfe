"""Prefix cache for hybrid models: whole-state snapshots keyed by the token prefix.

A Mamba layer's state cannot be cut back to an earlier position, so block-level KV reuse (vLLM's
automatic prefix caching) does not carry over; vLLM's hybrid support ends up inert or disabled in many
deployments. Here an entry is everything a slot needs to resume after `n` tokens:

* every Mamba layer's conv window and SSM state after token n-1,
* the K/V of positions < n of every attention layer, and the MTP block's K/V of positions < n-1 (its
  entry for position n-1 depends on token n, which a later request may not share),
* the backbone's final hidden state at position n-1: the logits of a request whose whole prompt is
  cached come from it, and the MTP block's next entry starts from it.

The engine saves entries at prefill chunk boundaries that fall on multiples of `block_size` (the
scheduler aligns chunks so they do; vLLM's `mamba_cache_mode="align"`), at the end of each prompt and at
the end of each request (prompt + generated tokens: a multi-turn conversation resends exactly this).
A request restores the longest saved prefix of its prompt and prefills only the rest.

Keys are (length, SHA-256 of the int64 token bytes); the token bytes are kept and compared on a hit, so
a hash collision can never return a wrong state. Lookup hashes the prompt once, taking a digest at each
saved length. Memory is bounded by `max_bytes` (entry bytes = tensors + token bytes) with LRU eviction.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..model.cache import SlotState


@dataclass
class PrefixEntry:
    tokens: bytes
    state: SlotState
    hidden: torch.Tensor           # backbone output (after norm_f) at position length-1, [d]

    @property
    def length(self) -> int:
        return self.state.length

    def nbytes(self) -> int:
        return self.state.nbytes() + self.hidden.numel() * self.hidden.element_size() + len(self.tokens)


@dataclass
class PrefixCacheStats:
    queries: int = 0
    hits: int = 0
    query_tokens: int = 0          # prompt tokens looked up
    hit_tokens: int = 0            # of those, tokens restored instead of prefilled
    saved: int = 0
    evicted: int = 0
    rejected: int = 0              # entries larger than the whole budget

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype=np.int64).tobytes()


class PrefixCache:
    def __init__(self, max_bytes: int = 256 << 20, block_size: int = 64):
        if max_bytes < 0 or block_size < 1:
            raise ValueError("prefix cache: max_bytes must be >= 0 and block_size >= 1")
        self.max_bytes, self.block_size = max_bytes, block_size
        self.entries: OrderedDict[tuple[int, bytes], PrefixEntry] = OrderedDict()   # LRU order
        self.lengths: dict[int, int] = {}          # saved length -> number of entries with it
        self.bytes = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        b = _token_bytes(tokens)
        return (len(tokens), hashlib.sha256(b).digest()) in self.entries

    def lookup(self, tokens: Sequence[int], max_len: int | None = None) -> PrefixEntry | None:
        """The entry for the longest saved prefix of `tokens` of length <= max_len (default: all)."""
        self.stats.queries += 1
        self.stats.query_tokens += len(tokens)
        limit = len(tokens) if max_len is None else min(max_len, len(tokens))
        cands = sorted(n for n in self.lengths if 0 < n <= limit)
        if not cands:
            return None
        data = _token_bytes(tokens[:cands[-1]])
        h, pos, digests = hashlib.sha256(), 0, {}
        for n in cands:
            h.update(data[pos * 8:n * 8])
            pos = n
            digests[n] = h.copy().digest()
        for n in reversed(cands):
            key = (n, digests[n])
            e = self.entries.get(key)
            if e is not None and e.tokens == data[:n * 8]:
                self.entries.move_to_end(key)
                self.stats.hits += 1
                self.stats.hit_tokens += n
                return e
        return None

    def save(self, tokens: Sequence[int], state: SlotState, hidden: torch.Tensor) -> bool:
        """Store the state after `tokens` (state.length == len(tokens)); False if it cannot fit."""
        assert state.length == len(tokens), (state.length, len(tokens))
        data = _token_bytes(tokens)
        key = (len(tokens), hashlib.sha256(data).digest())
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        e = PrefixEntry(data, state, hidden.detach().clone())
        size = e.nbytes()
        if size > self.max_bytes:
            self.stats.rejected += 1
            return False
        while self.bytes + size > self.max_bytes:
            self._evict()
        self.entries[key] = e
        self.lengths[key[0]] = self.lengths.get(key[0], 0) + 1
        self.bytes += size
        self.stats.saved += 1
        return True

    def has(self, tokens: Sequence[int]) -> bool:
        return tokens in self

    def _evict(self) -> None:
        (n, _), e = self.entries.popitem(last=False)
        self.bytes -= e.nbytes()
        self.lengths[n] -= 1
        if not self.lengths[n]:
            del self.lengths[n]
        self.stats.evicted += 1

    def clear(self) -> None:
        self.entries.clear()
        self.lengths.clear()
        self.bytes = 0

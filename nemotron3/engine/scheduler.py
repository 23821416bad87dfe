"""Continuous-batching scheduler: which sequences run in the next engine step, and how many tokens each.

Each step has a token budget (`max_num_batched_tokens`). Every running sequence that has finished its
prefill decodes in the step (1 token, or 1 + k with k speculative drafts): they all go through ONE
batched forward, each row continuing its own cache slot at its own position. The rest of the budget
goes to prefill, first to sequences whose prompt is partly prefilled (FCFS), then to waiting requests,
which are admitted while a cache slot is free (`max_num_seqs` slots). Long prompts are prefilled in
chunks; with prefix caching the chunk ends are aligned to multiples of `block_size` so that every chunk
boundary can be saved and later reused.

When a sequence finishes its slot is freed at once and, if it leaves a hole below the highest decoding
slot, that sequence is moved down into it (`HybridCache.copy_slot`): decoding sequences then occupy a
contiguous run of slots, which the cache reads and writes through views instead of gathering K/V.
"""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .detokenizer import Detokenizer
from .grammar import GrammarState
from .reasoning import ThinkingBudget
from .sampling import Logprob, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)                               # identity semantics: sequences live in lists
class Sequence:
    """One generated continuation (a request with `n > 1` has n of them)."""
    request_id: str
    index: int                                   # child index within the request
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    max_tokens: int
    stop_ids: frozenset[int]
    budget: ThinkingBudget | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0                        # tokens fed through the backbone (= cache length of the slot)
    num_cached: int = 0                          # prompt tokens restored from the prefix cache
    last_hidden: torch.Tensor | None = None      # backbone output at position num_computed - 1
    prompt_tokens: torch.Tensor | None = None    # distinct prompt token ids (repetition penalty), built once
    drafts: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None      # [k, V] draft distributions (sampling only)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    spec_steps: int = 0                          # verify forwards this sequence took part in
    spec_drafted: int = 0
    spec_accepted: int = 0
    answer_start: int | None = 0                 # index in output_ids where the answer (after </think>) starts;
                                                 # None while the output is still inside the prompt's <think>
    detok: Detokenizer | None = None              # the output's text (None without a tokenizer)
    sent_ids: int = 0                            # output ids already streamed
    grammar: GrammarState | None = None          # structured outputs: the answer's matcher (grammar.py)

    @property
    def seq_id(self) -> tuple[str, int]:
        return self.request_id, self.index

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def token(self, pos: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < p else self.output_ids[pos - p]

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class SchedulerOutput:
    decode: list[Sequence] = field(default_factory=list)          # ordered by slot
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)   # (sequence, tokens this step)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, num_speculative_tokens: int = 0,
                 block_size: int | None = None, on_admit: Callable[[Sequence], None] | None = None,
                 on_move: Callable[[Sequence, int], None] | None = None):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.k = num_speculative_tokens
        self.block_size = block_size            # align prefill chunk ends (prefix caching), or None
        self.on_admit = on_admit                # slot assigned: restore a cached prefix, set num_computed
        self.on_move = on_move                  # (sequence, new slot): copy its state
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots: list[int] = list(range(max_num_seqs))
        self.wait_for: dict[tuple[str, int], Sequence] = {}   # sibling that must prefill first

    # ---- bookkeeping ----
    def reset(self) -> None:
        """Forget every sequence and free every slot (the engine's recovery after a failed step)."""
        for seq in (*self.waiting, *self.running):
            seq.slot = None
        self.waiting.clear()
        self.running.clear()
        self.wait_for.clear()
        self.free_slots = list(range(self.max_num_seqs))

    def add(self, seq: Sequence, after: Sequence | None = None) -> None:
        """Queue a sequence; `after`: a sibling whose prompt prefill must finish first (prefix reuse)."""
        if after is not None:
            self.wait_for[seq.seq_id] = after
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, seq: Sequence) -> None:
        """Free the sequence's slot (called once it has FINISHED status) and compact decoding slots."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.wait_for.pop(seq.seq_id, None)
        if seq.slot is None:
            return
        hole, seq.slot = seq.slot, None
        self.free_slots.append(hole)
        # move the highest-slot decoding sequence down into the hole (keeps decode slots contiguous)
        decoding = [s for s in self.running if s.status is Status.DECODE]
        if decoding and self.on_move is not None:
            top = max(decoding, key=lambda s: s.slot)
            if top.slot > hole:
                old = top.slot
                self.on_move(top, hole)
                top.slot = hole
                self.free_slots.remove(hole)
                self.free_slots.append(old)
        self.free_slots.sort()

    # ---- planning ----
    def _chunk(self, seq: Sequence, budget: int) -> int:
        remaining = seq.prompt_len - seq.num_computed
        n = min(remaining, budget)
        if n < remaining and self.block_size:          # end the chunk on a block boundary if we can
            end = (seq.num_computed + n) // self.block_size * self.block_size
            if end > seq.num_computed:
                n = end - seq.num_computed
        return n

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        out.decode = sorted((s for s in self.running if s.status is Status.DECODE), key=lambda s: s.slot)
        budget = self.max_num_batched_tokens - len(out.decode) * (1 + self.k)
        for seq in self.running:
            if seq.status is Status.PREFILL and budget > 0:
                n = self._chunk(seq, budget)
                out.prefill.append((seq, n))
                budget -= n
        while self.waiting and self.free_slots and budget > 0:
            seq = self.waiting[0]
            dep = self.wait_for.get(seq.seq_id)
            if dep is not None and dep.status in (Status.WAITING, Status.PREFILL):
                break                                   # FCFS: later requests wait behind it too
            self.waiting.popleft()
            self.wait_for.pop(seq.seq_id, None)
            seq.slot = self.free_slots.pop(0)
            seq.status = Status.PREFILL
            self.running.append(seq)
            if self.on_admit is not None:
                self.on_admit(seq)                      # may restore a cached prefix
            n = self._chunk(seq, budget)
            out.prefill.append((seq, n))                # n == 0: the whole prompt was cached
            budget -= n
        return out

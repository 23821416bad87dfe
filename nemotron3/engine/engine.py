"""The inference engine: `LLMEngine` (one step at a time), `LLM` (vLLM-style batch API) and
`AsyncLLMEngine` (streaming, for the server).

    llm = LLM("models/pico", num_speculative_tokens=2)
    outs = llm.generate(["def fib(n):", [1, 2, 3]], SamplingParams(temperature=0.8, seed=1, max_tokens=64))
    outs[0].outputs[0].text, outs[0].metrics.ttft, llm.stats()

An engine step (`LLMEngine.step`) runs what the scheduler picked: all decoding sequences in one batched
forward over their cache slots (with MTP speculation: one verify forward of k+1 positions per sequence,
then the MTP drafts), then the prefill chunks, then samples, detokenizes, checks stop conditions and frees
the slots of finished sequences. Everything runs under `torch.inference_mode`. A decode step with a single
running sequence (and no speculation) goes through `model/decode.py`'s `DecodePlan` on fp32 CPU models
(`fast_decode=False` turns it off); so do up to PLAN_MAX_ROWS sequences in one call when the plan runs in its
C kernel (1.3-2.7x cheaper than the batched forward at 2-64 sequences: bench/RESULTS.md).

Per-sequence invariants between steps (they make prefix-cache snapshots and speculation compose):
`cache.lengths[slot] == num_computed` (tokens fed through the backbone; in decode that is every token
but the last generated one), `Sequence.last_hidden` is the backbone output at position num_computed - 1,
and with speculation `cache.mtp_lengths[slot] == num_computed - 1` (see speculative.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence as Seq

import torch

from ..model import HybridCache, NemotronHForCausalLM
from ..tokenizer import encode_text
from ..model.decode import DecodePlan, matmul as decode_matmul, native_library, supported as decode_supported
from .outputs import CompletionOutput, RequestMetrics, RequestOutput, SpecAcceptance
from .prefix_cache import PrefixCache
from .reasoning import MEDIUM_THINKING_BUDGET, ReasoningTokens, ThinkingBudget, effective_budget
from .sampling import (Penalties, RowConstraint, SamplingParams, choose, constrain, logprobs_for, probabilities,
                       uniforms)
from .scheduler import Scheduler, Sequence, Status
from .speculative import accept_greedy, accept_sampled, draft

_DETOK_CONTEXT = 4          # prompt tokens kept as decoding context for the first generated tokens
PLAN_MAX_ROWS = 64          # decode steps of at most this many sequences run the C plan (all rows in one call)


@dataclass
class EngineStats(SpecAcceptance):
    steps: int = 0
    prefill_tokens: int = 0          # prompt tokens run through the backbone (cached ones excluded)
    cached_tokens: int = 0           # prompt tokens restored from the prefix cache
    decode_tokens: int = 0           # tokens emitted by decode steps
    decode_forwards: int = 0
    spec_verify_steps: int = 0       # (sequence, round) pairs
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    finished: bool = False
    num_finished: int = 0


def _int_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _int_scalar(t) -> bool:
    """A numpy integer or a 0-d integer tensor (accepted as a token id, as an int is)."""
    if isinstance(t, torch.Tensor):
        return t.dim() == 0 and _int_dtype(t.dtype)
    return hasattr(t, "__index__") and not isinstance(t, bool) and type(t).__name__.startswith(("int", "uint"))


def _decode(tok, ids, skip_special_tokens: bool) -> str:
    return tok.decode(ids, skip_special_tokens=skip_special_tokens)


class LLMEngine:
    """Synchronous engine core: `add_request`, `step`, `abort_request`. Not thread-safe (the async
    engine drives it from one worker thread)."""

    def __init__(self, model: NemotronHForCausalLM, tokenizer=None, *, max_num_seqs: int = 16,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 num_speculative_tokens: int = 0, enable_prefix_caching: bool = True,
                 prefix_cache_bytes: int = 256 << 20, block_size: int = 64, seed: int = 0,
                 reasoning_tokens: ReasoningTokens | None = None,
                 medium_thinking_budget: int = MEDIUM_THINKING_BUDGET, fast_decode: bool = True,
                 threads: int | None = None):
        cfg = model.config
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.threads = threads           # the C decode kernel's threads (None: torch's thread count)
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs!r}")
        k = num_speculative_tokens
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"num_speculative_tokens must be an integer >= 0, got {k!r}")
        if k and model.mtp is None:
            raise ValueError("num_speculative_tokens > 0 needs a model with an MTP block "
                             "(config num_nextn_predict_layers >= 1)")
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_model_len > cfg.max_position_embeddings:
            # NoPE attention and Mamba have no position table: a longer context runs, and whether the model
            # generalises to it is the user's call (as vLLM's max_model_len override)
            warnings.warn(f"max_model_len {self.max_model_len} exceeds the config's max_position_embeddings "
                          f"({cfg.max_position_embeddings}); the model has no positional limit (NoPE + Mamba) "
                          f"but was trained on shorter sequences", stacklevel=3)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        need = max_num_seqs * (1 + k)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(512, need + block_size)
        elif max_num_batched_tokens <= need:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must exceed max_num_seqs x "
                             f"(1 + num_speculative_tokens) = {need}, or prefills could starve")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.k = k
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.medium_thinking_budget = medium_thinking_budget
        self.cache = HybridCache(cfg, max_num_seqs, max_len=min(self.max_model_len + k, 256),
                                 dtype=model.dtype, device=model.device)
        self.cache.capacity_limit = self.max_model_len + k
        self.prefix_cache = PrefixCache(prefix_cache_bytes, block_size) if enable_prefix_caching else None
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, k,
                                   block_size if enable_prefix_caching else None,
                                   on_admit=self._admit, on_move=self._move)
        if reasoning_tokens is None and tokenizer is not None:
            reasoning_tokens = ReasoningTokens.from_tokenizer(tokenizer)
        self.reasoning_tokens = reasoning_tokens
        eos = cfg.eos_token_id
        eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        if tokenizer is not None:
            for name in ("eos_id", "eos_token_id", "im_end_id"):
                v = getattr(tokenizer, name, None)
                if isinstance(v, int):
                    eos.add(v)
            im_end = tokenizer.token_to_id("<|im_end|>") if hasattr(tokenizer, "token_to_id") else None
            if im_end is not None:
                eos.add(im_end)
        self.eos_ids = frozenset(eos)
        self.requests: dict[str, _Request] = {}
        self.stream = True                 # an output per step for every request that progressed
        self.stats = EngineStats()
        self._seeds = random.Random(seed)
        self._touched: dict[str, None] = {}
        self._finished: list[Sequence] = []
        # batch-1 decode fast path (model/decode.py), built on first use for fp32 CPU models; the full
        # weight check (parameters replaced, not only updated) runs once per added request
        self.fast_decode = fast_decode
        self._plan: DecodePlan | None = None
        self._plan_full_check = True

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """`model.logits`, faster for a few rows on CPU: the C kernel's matmul reads lm_head where and as it is
        stored ([out, in], fp32 / bf16 / FP8 / NVFP4), once for all rows, on the engine's threads (MKL's
        F.linear at M=1 is ~4x slower on an [out, in] fp32 weight: 8192x256, 0.25 vs 1.1 ms)."""
        head = self.model.lm_head
        if h.shape[0] <= 64 and h.device.type == "cpu" and head.bias is None and head.weight.dtype == torch.float32:
            y = decode_matmul(h.float(), head, self.threads)
            if y is not None:
                return y
        return self.model.logits(h)

    # ------------------------------------------------------------------ requests
    def prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        """Accepts text, a list of token ids, or {'prompt': text} / {'prompt_token_ids': ids}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
                if not isinstance(prompt, (list, tuple, torch.Tensor)):
                    raise ValueError(f"prompt_token_ids must be a list of token ids, got {type(prompt).__name__}")
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or LLM(..., tokenizer=...)")
            text, ids = prompt, encode_text(self.tokenizer, prompt)
        elif isinstance(prompt, (list, tuple)):
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) and not _int_scalar(t)]
            if bad:
                raise ValueError(f"a token-id prompt must hold integers, got {type(bad[0]).__name__} {bad[0]!r}")
            text, ids = None, [int(t) for t in prompt]
        elif isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
            if not _int_dtype(prompt.dtype):
                raise ValueError(f"a token-id tensor prompt must have an integer dtype, got {prompt.dtype}")
            text, ids = None, prompt.tolist()
        else:
            raise ValueError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        V = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} out of range [0, {V})")
        return text, ids

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        text, ids = self.prompt_ids(prompt)
        self._plan_full_check = True
        P, L = len(ids), self.max_model_len
        if P >= L:
            raise ValueError(f"the prompt has {P} tokens but the model's context (max_model_len) is {L} "
                             f"tokens, which leaves no room to generate")
        max_tokens = params.max_tokens if params.max_tokens is not None else L - P
        if P + max_tokens > L:
            raise ValueError(f"max_tokens={max_tokens} does not fit: the prompt has {P} tokens and "
                             f"max_model_len is {L} (at most {L - P} new tokens)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (use stop token ids instead)")
        V = self.model.config.vocab_size
        if any(t >= V for t in params.stop_token_ids):
            raise ValueError(f"stop token id out of range [0, {V})")
        if any(t >= V for t in params.answer_prefix_ids or ()):
            raise ValueError(f"answer_prefix_ids: token id out of range [0, {V})")
        if any(t >= V for t in params.logit_bias or ()):
            raise ValueError(f"logit_bias: token id out of range [0, {V})")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        now = time.monotonic() if arrival_time is None else arrival_time
        budget = effective_budget(params.reasoning_mode, params.thinking_budget, max_tokens,
                                  self.medium_thinking_budget)
        seqs = []
        for i in range(params.n):
            seed = (params.seed + i) % (1 << 63) if params.seed is not None else self._seeds.getrandbits(63)
            tb = None if self.reasoning_tokens is None else \
                ThinkingBudget(self.reasoning_tokens, budget, params.reasoning_mode, ids)
            seq = Sequence(request_id, i, ids, params, torch.Generator().manual_seed(seed), max_tokens, stop_ids,
                           budget=tb, arrival_time=now)
            seq.answer_start = None if tb is not None and tb.inside else 0
            seq.logprobs = [] if params.logprobs is not None else None
            ctx = ids[-_DETOK_CONTEXT:]
            seq.detok_ids = list(ctx)
            seq.prefix_offset, seq.read_offset = 0, len(ctx)
            seqs.append(seq)
        req = _Request(request_id, text, ids, params, seqs, RequestMetrics(now, num_prompt_tokens=P))
        self.requests[request_id] = req
        for i, seq in enumerate(seqs):     # siblings restore the first one's prompt from the prefix cache
            self.scheduler.add(seq, after=seqs[0] if i and self.prefix_cache is not None else None)

    @torch.inference_mode()                # freeing a slot may move another sequence's cache (in-place copies)
    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for s in req.seqs:
            if not s.finished:
                self._finish(s, "abort")
        self._release_finished()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def drop_all_requests(self) -> None:
        """Forget every request and free every slot (after a failed step, whose state may be half-updated);
        a slot's cache is reset when it is next assigned."""
        for rid in list(self.requests):
            try:
                self.abort_request(rid)
            except Exception:             # noqa: BLE001 - the state is being thrown away anyway
                pass
        self.requests.clear()
        self._finished.clear()
        self._touched.clear()
        self.scheduler.reset()

    # ------------------------------------------------------------------ cache hooks
    def _admit(self, seq: Sequence) -> None:
        """Slot assigned: restore the longest cached prefix of the prompt, or start from a clean slot."""
        self.cache.reset([seq.slot])
        if self.prefix_cache is None:
            return
        e = self.prefix_cache.lookup(seq.prompt_ids)
        if e is None:
            return
        self.cache.restore(seq.slot, e.state)
        seq.num_computed = seq.num_cached = e.length
        seq.last_hidden = e.hidden
        self.stats.cached_tokens += e.length
        self.requests[seq.request_id].metrics.num_cached_tokens += e.length

    def _move(self, seq: Sequence, new_slot: int) -> None:
        self.cache.copy_slot(seq.slot, new_slot)

    def _save_prefix(self, seq: Sequence) -> None:
        n = seq.num_computed
        if self.prefix_cache is None or n == 0 or seq.last_hidden is None:
            return
        if self.cache.slot_nbytes(n)["total"] > self.prefix_cache.max_bytes:
            return                     # would be rejected: skip the O(length) snapshot (long prompts)
        tokens = seq.all_ids()[:n]
        if self.prefix_cache.has(tokens):
            return
        self.prefix_cache.save(tokens, self.cache.snapshot(seq.slot, n, n - 1 if self.k else 0), seq.last_hidden)

    # ------------------------------------------------------------------ sampling helpers
    def _constraint(self, seq: Sequence, extra: Seq[int] = ()) -> RowConstraint | None:
        """Bias/penalties and forced/banned tokens for the position after `output_ids + extra`."""
        forced, banned = None, ()
        if seq.budget is not None:
            st = seq.budget
            if extra:
                st = st.copy()
                for t in extra:
                    st.advance(t)
            c = st.constraint()
            if c is not None:
                forced, banned = c.forced, c.banned
        if len(seq.output_ids) + len(extra) < seq.params.min_tokens:
            banned = tuple(banned) + tuple(seq.stop_ids)
        prefix = seq.params.answer_prefix_ids
        if prefix and forced is None:          # the server's tool_choice: force the answer to open a call
            j = self._answer_pos(seq, extra)
            if j is not None and j < len(prefix):
                forced, banned = prefix[j], ()
        pen = None
        if seq.params.adjusts_logits:
            if seq.prompt_tokens is None and seq.params.repetition_penalty != 1:
                seq.prompt_tokens = torch.tensor(seq.prompt_ids, dtype=torch.long).unique()
            pen = Penalties(seq.params, seq.prompt_tokens, seq.output_ids + list(extra) if extra else seq.output_ids)
        if forced is None and not banned and pen is None:
            return None
        return RowConstraint(forced, banned, pen)

    def _answer_pos(self, seq: Sequence, extra: Seq[int] = ()) -> int | None:
        """Position within the answer of the token after `output_ids + extra` (None: still thinking)."""
        if seq.answer_start is not None:
            return len(seq.output_ids) + len(extra) - seq.answer_start
        end = self.reasoning_tokens.think_end if self.reasoning_tokens is not None else None
        for i, t in enumerate(extra):
            if t == end:
                return len(extra) - i - 1
        return None

    def _append(self, seq: Sequence, token: int, logprob=None) -> None:
        """Emit one token: stop checks, detokenization, logprobs, budget accounting."""
        now = time.monotonic()
        req = self.requests[seq.request_id]
        if seq.first_token_time is None:
            seq.first_token_time = now
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
        seq.output_ids.append(token)
        req.metrics.num_generated_tokens += 1
        if seq.answer_start is None and self.reasoning_tokens is not None and \
                token == self.reasoning_tokens.think_end:
            seq.answer_start = len(seq.output_ids)
        if seq.budget is not None:
            before = seq.budget.count
            seq.budget.advance(token)
            req.metrics.reasoning_tokens += seq.budget.count - before
        if seq.logprobs is not None and logprob is not None:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob[token].logprob
        self._touched[seq.request_id] = None
        if token in seq.stop_ids:
            if seq.params.include_stop_str_in_output and self.tokenizer is not None:
                self._detokenize(seq, token)           # vLLM: the stop token's text is kept only then
            self._finish(seq, "stop", None if token in self.eos_ids and token not in seq.params.stop_token_ids
                         else token)
            return
        if self.tokenizer is not None:
            before = len(seq.text)
            self._detokenize(seq, token)
            # vLLM: stop strings count only once more than min_tokens tokens exist, and only where they end
            # in the text of such a token
            if seq.params.stop and len(seq.text) > before and len(seq.output_ids) > seq.params.min_tokens \
                    and self._check_stop_strings(seq, before):
                return
        if len(seq.output_ids) >= seq.max_tokens:
            self._finish(seq, "length")

    def _detokenize(self, seq: Sequence, token: int) -> None:
        """Incremental detokenization (vLLM's prefix/read offsets; partial UTF-8 is held back)."""
        ids = seq.detok_ids
        ids.append(token)
        skip = seq.params.skip_special_tokens
        prefix = _decode(self.tokenizer, ids[seq.prefix_offset:seq.read_offset], skip)
        full = _decode(self.tokenizer, ids[seq.prefix_offset:], skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)

    def _check_stop_strings(self, seq: Sequence, new_from: int) -> bool:
        """Find the earliest stop string that ends in the text added since `new_from`; cut the text."""
        stops = seq.params.stop
        start = max(0, new_from - max(len(s) for s in stops) + 1)
        hit = None
        for s in stops:
            i = seq.text.find(s, start)
            if i >= 0 and (hit is None or i < hit[0]):
                hit = (i, s)
        if hit is None:
            return False
        i, s = hit
        seq.text = seq.text[:i + len(s)] if seq.params.include_stop_str_in_output else seq.text[:i]
        self._finish(seq, "stop", s)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        if seq.finished:
            return
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.finish_time = time.monotonic()
        self._finished.append(seq)
        self._touched[seq.request_id] = None

    def _release_finished(self) -> None:
        """After the step's forwards: save end-of-request prefixes and free the slots."""
        for seq in self._finished:
            if seq.slot is not None:
                self._save_prefix(seq)
            self.scheduler.finish(seq)
            req = self.requests.get(seq.request_id)
            if req is not None:
                req.num_finished += 1
                if req.num_finished == len(req.seqs):
                    req.finished = True
                    req.metrics.finished_time = time.monotonic()
        self._finished.clear()

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return an output for every request that made progress (only for
        finished requests when `stream` is off)."""
        plan = self.scheduler.schedule()
        self.stats.steps += 1
        if plan.decode:
            (self._decode_spec if self.k else self._decode)(plan.decode)
        finals = [seq for seq, n in plan.prefill if self._prefill_chunk(seq, n)]
        if finals:
            self._first_tokens(finals)
        self._release_finished()
        outs = []
        for rid in self._touched:
            req = self.requests.get(rid)
            if req is not None and (self.stream or req.finished):
                outs.append(self._output(req))
                if req.finished:
                    del self.requests[rid]
        self._touched.clear()
        return outs

    def _emit_logits(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence from logits [B, V] and emit it."""
        cons = [self._constraint(s) for s in seqs]
        toks, _ = choose(logits, [s.params for s in seqs], [s.generator for s in seqs], cons)
        lps = self._logprobs(seqs, logits, toks)
        for s, t, lp in zip(seqs, toks, lps):
            self._append(s, t, lp)

    def _logprobs(self, seqs, logits, toks):
        want = [s.params.logprobs for s in seqs]
        if all(w is None for w in want):
            return [None] * len(seqs)
        dec = None if self.tokenizer is None else (lambda ids: _decode(self.tokenizer, ids, False))
        return logprobs_for(logits, toks, want, dec)

    def decode_path(self) -> str:
        """What plain decode steps run through, in words (the server prints it at startup)."""
        if self.k:
            return f"speculative (k = {self.k}), the batched forward"
        if not (self.fast_decode and decode_supported(self.model)):
            return "the batched forward"
        if native_library() is None:
            return "the decode plan in torch ops at batch 1 (no C kernel), the batched forward above"
        return f"the decode plan's C kernel up to {PLAN_MAX_ROWS} sequences, the batched forward above"

    def _decode_plan(self) -> DecodePlan | None:
        """The batch-1 decode plan, or None when the model is not one it covers (checked, with the
        weights' identities, once per added request; in-place weight updates are checked every step)."""
        if self._plan_full_check:
            self._plan_full_check = False
            if not decode_supported(self.model):
                self._plan = None
                return None
            if self._plan is None or self._plan.stale(full=True):
                self._plan = DecodePlan(self.model, threads=self.threads)
        elif self._plan is not None and self._plan.stale(full=False):
            self._plan = DecodePlan(self.model, threads=self.threads)
        return self._plan

    def _decode(self, seqs: list[Sequence]) -> None:
        m, dev = self.model, self.model.device
        plan = self._decode_plan() if self.fast_decode and len(seqs) <= PLAN_MAX_ROWS else None
        if plan is not None and (len(seqs) == 1 or plan.native is not None):
            h = plan.step_rows([s.output_ids[-1] for s in seqs], self.cache, [s.slot for s in seqs])
        else:
            ids = torch.tensor([[s.output_ids[-1]] for s in seqs], dtype=torch.long, device=dev)
            h = m.hidden_states(ids, self.cache, [s.slot for s in seqs])[:, -1]
        for b, s in enumerate(seqs):
            s.num_computed += 1
            s.last_hidden = h[b]
        self.stats.decode_forwards += 1
        self.stats.decode_tokens += len(seqs)
        self._emit_logits(seqs, self.logits(h))

    def _prefill_chunk(self, seq: Sequence, n: int) -> bool:
        """Run prompt tokens [num_computed, num_computed + n) through the backbone (n = 0: the prompt
        was restored whole from the prefix cache). Returns True when the prompt is complete."""
        s, e = seq.num_computed, seq.num_computed + n
        prev = seq.last_hidden
        if n:
            ids = torch.tensor([seq.prompt_ids[s:e]], dtype=torch.long, device=self.model.device)
            H = self.model.hidden_states(ids, self.cache, [seq.slot])[0]
            seq.num_computed, seq.last_hidden = e, H[-1]
            self.stats.prefill_tokens += n
            if self.k:
                self._mtp_chunk(seq, s, e, prev, H)
        final = e == seq.prompt_len
        if not final and self.prefix_cache is not None and e % self.block_size == 0:
            self._save_prefix(seq)
        return final

    def _first_tokens(self, seqs: list[Sequence]) -> None:
        """Prompts complete: sample every sequence's first token in one batch, then (speculation) write
        the MTP entry of the last prompt position, which needs that token, and draft."""
        hid = torch.stack([s.last_hidden for s in seqs])
        for s in seqs:
            s.status = Status.DECODE
        self._emit_logits(seqs, self.logits(hid))
        if self.k:
            live = [b for b, s in enumerate(seqs) if not s.finished]
            if live:
                lv = [seqs[b] for b in live]
                ids = torch.tensor([[s.output_ids[-1]] for s in lv], dtype=torch.long, device=self.model.device)
                lslots = [s.slot for s in lv]
                # the MTP block's Mamba state (if it has Mamba layers) stays after entry P-2, as its K/V
                # length does (mtp_length = num_computed - 1): entry P-1 is written again next round
                saved = self.cache.mtp_mamba_state(lslots)
                mh = self.model.mtp_hidden_states(hid[live][:, None], ids, 1, self.cache, lslots)[:, 0]
                draft(self.model, self.cache, lv, self.logits(mh), mh, self.k, self._constraint, self.logits)
                self.cache.set_mtp_mamba_state(lslots, saved)
        for s in seqs:
            self._save_prefix(s)                       # end of prompt (n > 1 siblings and retries reuse it)

    # ------------------------------------------------------------------ speculative decoding
    def _mtp_chunk(self, seq: Sequence, s: int, e: int, prev, H) -> None:
        """MTP entries for a prefill chunk [s, e): entry j pairs the backbone hidden at j with token
        j + 1, so entries s-1 .. e-2 can be written now; entry e-1 stays pending (invariant
        mtp_length = num_computed - 1) until token e is fed or, after the last chunk, sampled."""
        p0 = s - 1 if s > 0 else 0
        hid = ([prev] if s > 0 else []) + list(H[:-1].unbind(0))
        if not hid:
            return
        assert int(self.cache.mtp_lengths[seq.slot]) == p0, (int(self.cache.mtp_lengths[seq.slot]), p0)
        toks = [seq.token(j + 1) for j in range(p0, p0 + len(hid))]
        ids = torch.tensor([toks], dtype=torch.long, device=self.model.device)
        self.model.mtp_hidden_states(torch.stack(hid)[None], ids, 1, self.cache, [seq.slot])

    def _decode_spec(self, seqs: list[Sequence]) -> None:
        """One speculative round for all decoding sequences (see speculative.py)."""
        m, k, dev = self.model, self.k, self.model.device
        B = len(seqs)
        slots = [s.slot for s in seqs]
        t0 = [s.num_computed for s in seqs]
        prev = torch.stack([s.last_hidden for s in seqs])                     # [B, d] hidden at t-1
        drafts = torch.tensor([s.drafts for s in seqs], dtype=torch.long)     # [B, k]
        ids = torch.cat([torch.tensor([[s.output_ids[-1]] for s in seqs]), drafts], 1).to(dev)
        H = m.hidden_states(ids, self.cache, slots, record_states=True)         # [B, k+1, d]
        logits = self.logits(H.reshape(B * (k + 1), -1)).view(B, k + 1, -1)   # [B, k+1, V]
        V = logits.shape[-1]
        cons = [self._constraint(s, s.drafts[:i]) for s in seqs for i in range(k + 1)]
        flat = constrain(logits.reshape(B * (k + 1), V), cons)
        target = flat.argmax(-1).view(B, k + 1).cpu()
        a, nxt = accept_greedy(drafts, target)
        sampled = [b for b, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            sel = torch.tensor(sampled)
            p = probabilities(flat.view(B, k + 1, V)[sel].reshape(-1, V),
                              [seqs[b].params for b in sampled for _ in range(k + 1)]).view(len(sampled), k + 1, V)
            q = torch.stack([seqs[b].draft_probs for b in sampled])
            u = uniforms([seqs[b].generator for b in sampled], k + 1)
            a_s, nxt_s = accept_sampled(drafts[sel], p.cpu(), q.cpu(), u)
            a[sel], nxt[sel] = a_s, nxt_s
        a, nxt = a.tolist(), nxt.tolist()
        want_lp = any(s.params.logprobs is not None for s in seqs)
        keep = []
        for b, s in enumerate(seqs):
            toks = s.drafts[:a[b]] + [nxt[b]]
            lps = self._logprobs([s] * len(toks), logits[b, :len(toks)], toks) if want_lp else [None] * len(toks)
            kept = 0
            for tok, lp in zip(toks, lps):
                self._append(s, tok, lp)
                kept += 1
                if s.finished:
                    break
            idx = kept - 1                           # < a[b] + 1 only when a stop cut the round short
            keep.append(idx)
            s.num_computed = t0[b] + idx + 1
            self.cache.lengths[s.slot] = s.num_computed
            s.last_hidden = H[b, idx]
            s.spec_steps += 1
            s.spec_drafted += k
            s.spec_accepted += a[b]
            met = self.requests[s.request_id].metrics
            met.spec_verify_steps += 1
            met.spec_draft_tokens += k
            met.spec_accepted_tokens += a[b]
            self.stats.decode_tokens += kept
        self.stats.spec_accepted_tokens += sum(a)
        self.stats.decode_forwards += 1
        self.stats.spec_verify_steps += B
        self.stats.spec_draft_tokens += B * k
        self.cache.keep_recorded(slots, keep)
        # MTP entries t-1 .. t+idx (tokens x_t, d_1 .., the last emitted one; junk after), then drafts
        mtp_ids = [[s.token(t0[b] + j) if t0[b] + j < s.prompt_len + len(s.output_ids) else 0
                    for j in range(k + 2)] for b, s in enumerate(seqs)]
        hid = torch.cat([prev[:, None], H], 1)                                  # [B, k+2, d]
        mh = m.mtp_hidden_states(hid, torch.tensor(mtp_ids, dtype=torch.long, device=dev), 1, self.cache, slots,
                                 record_states=True)
        last = mh[torch.arange(B), torch.tensor(keep) + 1]                    # [B, d]
        for b, s in enumerate(seqs):
            self.cache.mtp_lengths[s.slot] = t0[b] + keep[b] + 1 if not s.finished else s.num_computed - 1
        live = [b for b, s in enumerate(seqs) if not s.finished]
        # Mamba layers of the MTP block (if any) roll back like the backbone's: the state after entry
        # t0-1+keep (entries < num_computed - 1, the invariant) is kept; drafting starts one entry later
        rec = self.cache.recorded
        self.cache.keep_recorded(slots, keep)
        if live:
            sel = torch.tensor(live)
            lslots = [slots[b] for b in live]
            saved = self.cache.mtp_mamba_state(lslots)
            if rec:
                self.cache.recorded = {i: (c[sel], st[sel]) for i, (c, st) in rec.items()}
                self.cache.keep_recorded(lslots, [keep[b] + 1 for b in live])
            draft(m, self.cache, [seqs[b] for b in live], self.logits(last[sel]), last[sel], k, self._constraint,
                  self.logits)
            self.cache.set_mtp_mamba_state(lslots, saved)

    # ------------------------------------------------------------------ outputs
    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for s in req.seqs:
            text = s.text
            if s.params.stop and not s.finished:             # hold back a possible stop-string prefix
                text = text[:max(s.sent_text, len(text) - (max(len(x) for x in s.params.stop) - 1))]
            delta_text, delta_ids = text[s.sent_text:], s.output_ids[s.sent_ids:]
            s.sent_text, s.sent_ids = len(text), len(s.output_ids)
            outs.append(CompletionOutput(
                s.index, text, list(s.output_ids),
                s.cumulative_logprob if s.logprobs is not None else None,
                list(s.logprobs) if s.logprobs is not None else None,
                s.finish_reason, s.stop_reason, delta_text, delta_ids,
                s.budget.count if s.budget is not None else 0))
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs,
                             all(s.finished for s in req.seqs), req.metrics)


# ====================================================================== LLM (batch API)

def _resolve_model(model, tokenizer, dtype):
    from ..checkpoint import load, parse_dtype
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        net = load(path, dtype=dtype)
        if tokenizer is None and (path / "tokenizer.json").exists():
            from ..tokenizer import load_tokenizer
            tokenizer = load_tokenizer(path)
    elif isinstance(model, NemotronHForCausalLM):
        net = model
        dt = parse_dtype(dtype)
        if dt is not None and dt != net.dtype:
            net = net.to(dt)
            for mo in net.moe_layers():                     # the router bias stays fp32, as checkpoint.load keeps it
                mo.gate.e_score_correction_bias.data = mo.gate.e_score_correction_bias.float()
    else:
        raise ValueError(f"model must be a path or a NemotronHForCausalLM, got {type(model).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    return net, tokenizer


class LLM:
    """vLLM-style offline API over `LLMEngine`.

    LLM(model_path_or_model, tokenizer=None, max_num_seqs=16, max_model_len=None (config's
    max_position_embeddings), num_speculative_tokens=0, enable_prefix_caching=True, dtype=None,
    fast_decode=True (batch-1 decode through `model/decode.py`'s DecodePlan on fp32 CPU models),
    threads=None (the C decode kernel's threads; None = torch's thread count), weight_dtype=None ('bfloat16':
    linear and expert weights kept in bf16 with fp32 activations, `quant.linear.store_bf16`), ...)
    """

    def __init__(self, model, tokenizer=None, *, max_num_seqs: int = 16, max_model_len: int | None = None,
                 num_speculative_tokens: int = 0, enable_prefix_caching: bool = True, dtype=None,
                 max_num_batched_tokens: int | None = None, prefix_cache_bytes: int = 256 << 20,
                 block_size: int = 64, seed: int = 0, reasoning_tokens: ReasoningTokens | None = None,
                 medium_thinking_budget: int = MEDIUM_THINKING_BUDGET, fast_decode: bool = True,
                 threads: int | None = None, weight_dtype=None):
        net, tok = _resolve_model(model, tokenizer, dtype)
        if weight_dtype in ("bf16", "bfloat16", torch.bfloat16):
            from ..quant.linear import store_bf16
            net = store_bf16(net)                   # W16A32: bf16 weights, the model's activation dtype
        elif weight_dtype is not None:
            raise ValueError(f"weight_dtype must be None or 'bfloat16', got {weight_dtype!r}")
        self.engine = LLMEngine(net, tok, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                max_num_batched_tokens=max_num_batched_tokens,
                                num_speculative_tokens=num_speculative_tokens,
                                enable_prefix_caching=enable_prefix_caching, prefix_cache_bytes=prefix_cache_bytes,
                                block_size=block_size, seed=seed, reasoning_tokens=reasoning_tokens,
                                medium_thinking_budget=medium_thinking_budget, fast_decode=fast_decode,
                                threads=threads)
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self) -> NemotronHForCausalLM:
        return self.engine.model

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Prompts: one text / token-id list / dict, or a list of them. Returns outputs in prompt order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1) or \
                (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple, torch.Tensor)):
            raise ValueError("prompts must be a text, a list of token ids, a dict, or a list of those; got "
                             f"{type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        eng = self.engine
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling params must be SamplingParams, got {type(p).__name__}")
        for p in prompts:                                   # validate everything before queueing anything
            eng.prompt_ids(p)
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = f"llm-{self._counter}"
                self._counter += 1
                eng.add_request(rid, prompt, p)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                eng.abort_request(rid)
            eng.requests = {r: q for r, q in eng.requests.items() if r not in ids}
            raise
        final: dict[str, RequestOutput] = {}
        stream, eng.stream = eng.stream, False            # only finished requests need an output
        try:
            while len(final) < len(ids):
                for out in eng.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            eng.stream = stream
        return [final[r] for r in ids]

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             chat_template_kwargs: dict | None = None, tools: list | None = None) -> list[RequestOutput]:
        """One conversation (a list of {'role', 'content'} dicts) or a list of them, rendered with the
        tokenizer's chat template. `reasoning_mode='off'` renders with `enable_thinking=False`."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        if not isinstance(messages, (list, tuple)):
            raise ValueError("messages must be a list of {'role', 'content'} dicts (or a list of such lists), "
                             f"got {type(messages).__name__}")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        for i, conv in enumerate(convs):
            if not isinstance(conv, (list, tuple)) or not conv or not all(isinstance(m, dict) for m in conv):
                raise ValueError(f"conversation {i} must be a non-empty list of {{'role', 'content'}} dicts")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(convs)
        else:
            params = list(sampling_params)
            if len(params) != len(convs):
                raise ValueError(f"{len(params)} sampling params for {len(convs)} conversations")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling params must be SamplingParams, got {type(p).__name__}")
        prompts = []
        for conv, p in zip(convs, params):
            kw = dict(chat_template_kwargs or {})
            if p.reasoning_mode == "off":
                kw.setdefault("enable_thinking", False)
            text = self.tokenizer.apply_chat_template(conv, tools=tools, add_generation_prompt=True,
                                                      tokenize=False, **kw)
            prompts.append({"prompt_token_ids": encode_text(self.tokenizer, text)})
        outs = self.generate(prompts, params)
        return outs

    def stats(self) -> dict:
        e = self.engine
        d = dict(vars(e.stats))
        d["spec_acceptance_rate"] = e.stats.spec_acceptance_rate
        d["spec_mean_accepted_length"] = e.stats.spec_mean_accepted_length
        if e.prefix_cache is not None:
            pc = e.prefix_cache
            d["prefix_cache"] = dict(vars(pc.stats), entries=len(pc), bytes=pc.bytes, max_bytes=pc.max_bytes,
                                     hit_rate=pc.stats.hit_rate)
        d["cache_bytes"] = e.cache.nbytes()
        d["slot_bytes_at_max_len"] = e.cache.slot_nbytes(e.max_model_len)
        return d


# ====================================================================== async engine

class AsyncLLMEngine:
    """Streaming front end for the server: `async for out in engine.generate(prompt, params, request_id)`
    yields a `RequestOutput` each time the request progresses (`delta_text` / `delta_token_ids` hold the
    new part); `await engine.abort(request_id)` stops one. A background task steps the engine in a
    single worker thread (the model never runs on the event loop, which stays responsive); requests
    added or aborted while a step runs take effect at the next step. Leaving the `async for` early (or
    cancelling the consumer) aborts the request."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nemotron3-engine")
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: deque = deque()           # ('add', rid, prompt, params) | ('abort', rid)
        self._lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errored: BaseException | None = None

    @classmethod
    def from_llm(cls, llm: LLM) -> "AsyncLLMEngine":
        return cls(llm.engine)

    @classmethod
    def from_model(cls, model, tokenizer=None, dtype=None, **engine_kwargs) -> "AsyncLLMEngine":
        net, tok = _resolve_model(model, tokenizer, dtype)
        return cls(LLMEngine(net, tok, **engine_kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _ensure_loop(self):
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        request_id = request_id or f"req-{id(object())}-{time.monotonic_ns()}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        self.engine.prompt_ids(prompt)            # fail fast on bad prompts (the length check is in add)
        self._ensure_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        with self._lock:
            self._pending.append(("add", request_id, prompt, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                with self._lock:
                    self._pending.append(("abort", request_id))
                if self._wake is not None:
                    self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Stop a request at the next step; its stream ends with a finish_reason 'abort' output."""
        with self._lock:
            self._pending.append(("abort", request_id))
        if self._wake is not None:
            self._wake.set()

    def _step(self) -> list:
        """Runs in the worker thread: apply queued adds/aborts, then one engine step."""
        results: list = []
        with self._lock:
            ops = list(self._pending)
            self._pending.clear()
        eng = self.engine
        for op in ops:
            if op[0] == "add":
                _, rid, prompt, params = op
                try:
                    eng.add_request(rid, prompt, params)
                except ValueError as e:
                    results.append((rid, e))
            else:
                rid = op[1]
                req = eng.requests.get(rid)
                if req is not None:
                    eng.abort_request(rid)
                    results.append((rid, eng._output(req)))
                    eng.requests.pop(rid, None)
        if eng.has_unfinished_requests():
            results.extend((o.request_id, o) for o in eng.step())
        return results

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                idle = not self._pending
            if idle and not self.engine.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._step)
            except Exception as e:                # a model error: fail every open request, keep serving
                self.errored = e
                for q in self._queues.values():
                    q.put_nowait(e)
                self.engine.drop_all_requests()
                continue
            for rid, item in results:
                q = self._queues.get(rid)
                if q is not None:
                    q.put_nowait(item)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=True)

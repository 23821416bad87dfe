"""`LLMEngine`: the synchronous engine core (`check_request`, `add_request`, `step`, `abort_request`).

    eng = LLMEngine(model, tokenizer, max_num_seqs=16, num_speculative_tokens=2)
    eng.add_request("r1", "def fib(n):", SamplingParams(max_tokens=32))
    while eng.has_unfinished_requests():
        for out in eng.step(): print(out.outputs[0].delta_text, end="")

An engine step runs what the scheduler picked: all decoding sequences in one batched forward over their cache
slots (with MTP speculation: `speculative.verify_round`, one verify forward of k+1 positions per sequence, then
the MTP drafts), then the prefill chunks, then samples, detokenizes (`detokenizer.py`), checks stop conditions
and frees the slots of finished sequences. Everything runs under `torch.inference_mode`. A decode step with a
single running sequence (and no speculation) goes through `decode_plan.py`'s `DecodePlan` on fp32 CPU models
(`fast_decode=False` turns it off); so do up to PLAN_MAX_ROWS sequences in one call when the plan runs in its
C kernel (1.3-2.7x cheaper than the batched forward at 2-64 sequences: bench/RESULTS.md).

Every rule a request must satisfy lives in `check_request` (the server calls it before it starts a stream,
`add_request` calls it again); a refusal is a `RequestError` naming the parameter. The batch API (`LLM`) is in
llm.py, the streaming one (`AsyncLLMEngine`) in async_engine.py.

Per-sequence invariants between steps (they make prefix-cache snapshots and speculation compose):
`cache.lengths[slot] == num_computed` (tokens fed through the backbone; in decode that is every token
but the last generated one), `Sequence.last_hidden` is the backbone output at position num_computed - 1,
and with speculation `cache.mtp_lengths[slot] == num_computed - 1` (see speculative.py).
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from ..model import HybridCache, NemotronHForCausalLM
from ..tokenizer import encode_text
from . import speculative
from .cpu_malloc import keep_freed_memory
from .decode_plan import DecodePlan, matmul as decode_matmul, native_library, supported as decode_supported
from .detokenizer import Detokenizer
from .grammar import Grammars
from .outputs import CompletionOutput, EngineSnapshot, EngineStats, RequestMetrics, RequestOutput
from .prefix_cache import PrefixCache
from .reasoning import MEDIUM_THINKING_BUDGET, ReasoningTokens, ThinkingBudget, effective_budget
from .sampling import Penalties, RowConstraint, SamplingParams, choose, logprobs_for
from .scheduler import Scheduler, Sequence, Status

PLAN_MAX_ROWS = 64          # decode steps of at most this many sequences run the C plan (all rows in one call)


class RequestError(ValueError):
    """A request the engine refuses. `param`: the request parameter at fault (SamplingParams' names, or
    'prompt'); `code`: 'context_length_exceeded' when the prompt or max_tokens does not fit the context."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


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


class LLMEngine:
    """Synchronous engine core: `check_request`, `add_request`, `step`, `abort_request`. Not thread-safe
    (the async engine drives it from one worker thread)."""

    def __init__(self, model: NemotronHForCausalLM, tokenizer=None, *, max_num_seqs: int = 16,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 num_speculative_tokens: int = 0, enable_prefix_caching: bool = True,
                 prefix_cache_bytes: int = 256 << 20, block_size: int = 64, seed: int = 0,
                 reasoning_tokens: ReasoningTokens | None = None,
                 medium_thinking_budget: int = MEDIUM_THINKING_BUDGET, fast_decode: bool = True,
                 kv_cache_dtype: str = "auto", threads: int | None = None):
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
        if model.device.type == "cpu":
            keep_freed_memory()            # prefill without page-faulting its activations (cpu_malloc.py)
        self.tokenizer = tokenizer
        self._detok_backend = None if tokenizer is None else getattr(tokenizer, "backend_tokenizer", None)
        if tokenizer is not None and self._detok_backend is None:
            raise ValueError("the engine needs a tokenizer backed by `tokenizers` (nemotron3's, or a transformers "
                             "fast tokenizer): detokenization streams through its backend_tokenizer")
        self.k = k
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.medium_thinking_budget = medium_thinking_budget
        # kv_cache_dtype (vLLM's flag): auto = the checkpoint's declaration (FP8 K/V with its scales) or the model
        # dtype; bfloat16; fp8 (HybridCache.for_model)
        self.cache = HybridCache.for_model(model, max_num_seqs, max_len=min(self.max_model_len + k, 256),
                                           kv_cache_dtype=kv_cache_dtype)
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
        # batch-1 decode fast path (decode_plan.py), built on first use for fp32 CPU models; the full
        # weight check (parameters replaced, not only updated) runs once per added request. It reads and
        # writes K/V as the cache stores them (fp32, bf16, FP8 E4M3 with the cache's scales).
        self.fast_decode = fast_decode
        self._plan: DecodePlan | None = None
        self._plan_full_check, self._plan_head = True, None
        self.grammars = None if tokenizer is None else Grammars(self._detok_backend, cfg.vocab_size, self.eos_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """`model.logits`, faster for a few rows on CPU: the C kernel's matmul reads lm_head where and as it is
        stored ([out, in], fp32 / bf16 / FP8 / NVFP4), once for all rows, on the engine's threads (MKL's
        F.linear at M=1 is ~4x slower on an [out, in] fp32 weight: 8192x256, 0.25 vs 1.1 ms)."""
        if h.shape[0] <= 64 and h.device.type == "cpu" and self._fused_head():
            y = decode_matmul(h.float(), self.model.lm_head, self.threads)
            if y is not None:
                return y
        return self.model.logits(h)

    def _fused_head(self) -> bool:
        """Whether the C kernel may compute the logits (no lm_head bias, fp32 activations); also in the plan's step."""
        return self.model.lm_head.bias is None and self.model.dtype == torch.float32

    # ------------------------------------------------------------------ requests
    def prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt: text, a list / 1-d tensor of token ids, or {'prompt': text} /
        {'prompt_token_ids': ids}. Only the form is checked here; `check_request` checks the ids."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
                if not isinstance(prompt, (list, tuple, torch.Tensor)):
                    raise RequestError(f"prompt_token_ids must be a list of token ids, got {type(prompt).__name__}",
                                       "prompt")
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise RequestError("a dict prompt needs 'prompt' or 'prompt_token_ids'", "prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer; pass token ids or LLM(..., tokenizer=...)",
                                   "prompt")
            return prompt, encode_text(self.tokenizer, prompt)
        if isinstance(prompt, (list, tuple)):
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) and not _int_scalar(t)]
            if bad:
                raise RequestError(f"a token-id prompt must hold integers, got {type(bad[0]).__name__} {bad[0]!r}",
                                   "prompt")
            return None, [int(t) for t in prompt]
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
            if not _int_dtype(prompt.dtype):
                raise RequestError(f"a token-id tensor prompt must have an integer dtype, got {prompt.dtype}",
                                   "prompt")
            return None, prompt.tolist()
        raise RequestError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}", "prompt")

    def check_request(self, prompt_ids: list[int], params: SamplingParams, max_model_len: int | None = None) -> int:
        """Every rule a request must satisfy beyond SamplingParams' own value checks; raises a `RequestError`
        naming the parameter at fault. Returns the request's max_tokens (the context's room when None).
        `max_model_len` may lower the context limit (the server's own limit), never raise it."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}", "params")
        V, P = self.model.config.vocab_size, len(prompt_ids)
        L = min(self.max_model_len, max_model_len or self.max_model_len)
        if not P:
            raise RequestError("the prompt is empty", "prompt")
        bad = [t for t in prompt_ids if not 0 <= t < V]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} out of range [0, {V})", "prompt")
        if P >= L:
            raise RequestError(f"the prompt has {P} tokens but the model's context (max_model_len) is {L} "
                               f"tokens, which leaves no room to generate", "prompt", "context_length_exceeded")
        max_tokens = params.max_tokens if params.max_tokens is not None else L - P
        if P + max_tokens > L:
            raise RequestError(f"max_tokens={max_tokens} does not fit: the prompt has {P} tokens and "
                               f"max_model_len is {L} (at most {L - P} new tokens)", "max_tokens",
                               "context_length_exceeded")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer (use stop token ids instead)", "stop")
        for name in ("stop_token_ids", "answer_prefix_ids", "logit_bias", "banned_token_ids"):
            bad = [t for t in getattr(params, name) or () if t >= V]
            if bad:
                raise RequestError(f"{name}: token id out of range [0, {V}): {bad[0]}", name)
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise RequestError("structured outputs need a tokenizer", "structured_outputs")
            try:
                self.grammars.compile(params.structured_outputs)
            except ValueError as e:
                raise RequestError(str(e), "structured_outputs") from None
        return max_tokens

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running", "request_id")
        text, ids = self.prompt_ids(prompt)
        max_tokens = self.check_request(ids, params)
        self._plan_full_check = True
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
            if params.structured_outputs is not None:
                seq.grammar = self.grammars.state(params.structured_outputs)
            if self.tokenizer is not None:
                seq.detok = Detokenizer(self._detok_backend, ids, params.skip_special_tokens, params.stop,
                                        params.include_stop_str_in_output)
            seqs.append(seq)
        req = _Request(request_id, text, ids, params, seqs, RequestMetrics(now, num_prompt_tokens=len(ids)))
        self.requests[request_id] = req
        for i, seq in enumerate(seqs):     # siblings restore the first one's prompt from the prefix cache
            self.scheduler.add(seq, after=seqs[0] if i and self.prefix_cache is not None else None)

    @torch.inference_mode()                # freeing a slot may move another sequence's cache (in-place copies)
    def abort_request(self, request_id: str) -> None:
        """Finish a request's sequences ('abort') and free their slots; its output comes with the next step."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for s in req.seqs:
            if not s.finished:
                self._finish(s, "abort")
        self._release_finished()

    def cancel(self, request_id: str) -> RequestOutput | None:
        """Abort a request and forget it now; returns its last output (None for an unknown id)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.abort_request(request_id)
        self._touched.pop(request_id, None)
        del self.requests[request_id]
        return self._output(req)

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

    def snapshot(self) -> EngineSnapshot:
        """What monitoring reads (the server's /metrics), in one object."""
        pc, st = self.prefix_cache, self.stats
        return EngineSnapshot(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting), max_num_seqs=self.max_num_seqs,
            cache_bytes=self.cache.nbytes(), prefix_cache_bytes=None if pc is None else pc.bytes,
            prefix_cache_hit_rate=None if pc is None else pc.stats.hit_rate, steps=st.steps,
            spec_draft_tokens=st.spec_draft_tokens, spec_accepted_tokens=st.spec_accepted_tokens,
            spec_acceptance_rate=st.spec_acceptance_rate)

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
        if seq.params.banned_token_ids:
            banned = tuple(banned) + tuple(seq.params.banned_token_ids)
        prefix, allowed = seq.params.answer_prefix_ids, None
        if (prefix or seq.grammar is not None) and forced is None:
            j = self._answer_pos(seq, extra)
            if j is not None and prefix and j < len(prefix):   # the answer's forced opening
                forced, banned = prefix[j], ()
            elif seq.grammar is not None and seq.grammar.trigger is not None:   # calls: thinking included
                allowed = seq.grammar.allowed(extra)
            elif j is not None and seq.grammar is not None:    # the grammar: over the answer's tokens only
                allowed = seq.grammar.allowed(extra[len(extra) - min(j, len(extra)):])
            elif j is None and seq.grammar is not None:
                banned = tuple(banned) + tuple(seq.stop_ids)   # thinking: a constrained answer must follow
        pen = None
        if seq.params.adjusts_logits:
            if seq.prompt_tokens is None and seq.params.repetition_penalty != 1:
                seq.prompt_tokens = torch.tensor(seq.prompt_ids, dtype=torch.long).unique()
            pen = Penalties(seq.params, seq.prompt_tokens, seq.output_ids + list(extra) if extra else seq.output_ids)
        if forced is None and not banned and pen is None and allowed is None:
            return None
        return RowConstraint(forced, banned, pen, allowed)

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
        elif seq.grammar is not None and (seq.answer_start is not None or seq.grammar.trigger is not None) \
                and token not in seq.stop_ids:
            seq.grammar.advance(token)
        if seq.budget is not None:
            before = seq.budget.count
            seq.budget.advance(token)
            req.metrics.reasoning_tokens += seq.budget.count - before
        if seq.logprobs is not None and logprob is not None:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob[token].logprob
        self._touched[seq.request_id] = None
        if token in seq.stop_ids:
            if seq.params.include_stop_str_in_output and seq.detok is not None:
                seq.detok.push(token)                  # vLLM: the stop token's text is kept only then
            self._finish(seq, "stop", None if token in self.eos_ids and token not in seq.params.stop_token_ids
                         else token)
            return
        if seq.detok is not None:
            before = len(seq.detok.text)
            # vLLM: stop strings count only once more than min_tokens tokens exist, and only where they end
            # in the text of such a token
            if seq.detok.push(token) and seq.params.stop and len(seq.output_ids) > seq.params.min_tokens:
                stop = seq.detok.find_stop(before)
                if stop is not None:
                    self._finish(seq, "stop", stop)
                    return
        if len(seq.output_ids) >= seq.max_tokens:
            self._finish(seq, "length")

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
            if self.k:
                speculative.verify_round(self, plan.decode)
            else:
                self._decode(plan.decode)
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
        tok = self.tokenizer
        dec = None if tok is None else (lambda ids: tok.decode(ids, skip_special_tokens=False))
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
            self._plan_head = self.model.lm_head if self._fused_head() else None    # lm_head in the kernel call
        elif self._plan is not None and self._plan.stale(full=False):
            self._plan = DecodePlan(self.model, threads=self.threads)
        return self._plan

    def _decode(self, seqs: list[Sequence]) -> None:
        m = self.model
        plan = self._decode_plan() if self.fast_decode and len(seqs) <= PLAN_MAX_ROWS else None
        logits = None
        if plan is not None and (len(seqs) == 1 or plan.native is not None):
            h, logits = plan.step_logits([s.output_ids[-1] for s in seqs], self.cache, [s.slot for s in seqs],
                                         self._plan_head)
        else:
            ids = torch.tensor([[s.output_ids[-1]] for s in seqs], dtype=torch.long, device=m.device)
            h = m.hidden_states(ids, self.cache, [s.slot for s in seqs])[:, -1]
        for b, s in enumerate(seqs):
            s.num_computed += 1
            s.last_hidden = h[b]
        self.stats.decode_forwards += 1
        self.stats.decode_tokens += len(seqs)
        self._emit_logits(seqs, self.logits(h) if logits is None else logits)

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
                speculative.mtp_prefill(self, seq, s, prev, H)
        final = e == seq.prompt_len
        if not final and self.prefix_cache is not None and e % self.block_size == 0:
            self._save_prefix(seq)
        return final

    def _first_tokens(self, seqs: list[Sequence]) -> None:
        """Prompts complete: sample every sequence's first token in one batch, then (speculation) draft."""
        hid = torch.stack([s.last_hidden for s in seqs])
        for s in seqs:
            s.status = Status.DECODE
        self._emit_logits(seqs, self.logits(hid))
        if self.k:
            speculative.first_drafts(self, seqs, hid)
        for s in seqs:
            self._save_prefix(s)                       # end of prompt (n > 1 siblings and retries reuse it)

    # ------------------------------------------------------------------ outputs
    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for s in req.seqs:
            text, delta_text = s.detok.emit(s.finished) if s.detok is not None else ("", "")
            delta_ids = s.output_ids[s.sent_ids:]
            s.sent_ids = len(s.output_ids)
            outs.append(CompletionOutput(
                s.index, text, list(s.output_ids),
                s.cumulative_logprob if s.logprobs is not None else None,
                list(s.logprobs) if s.logprobs is not None else None,
                s.finish_reason, s.stop_reason, delta_text, delta_ids,
                s.budget.count if s.budget is not None else 0))
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs,
                             all(s.finished for s in req.seqs), req.metrics)

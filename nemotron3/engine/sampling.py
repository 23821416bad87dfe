"""Sampling parameters (validated, vLLM names) and the batched sampler.

Design decisions:

* **One `torch.Generator` per sequence**, seeded from `SamplingParams.seed` (child `i` of an `n > 1`
  request uses `seed + i`), or from the engine's seed stream when unseeded. Every random number a
  sequence consumes comes from its own generator, so its output does not depend on what else is in the
  batch (up to fp32 rounding of batched matmuls, which moves a logit by ~1e-7).
* **Inverse-CDF sampling** with one uniform per token: `token = searchsorted(cumsum(p), u)`. It consumes a
  fixed amount of randomness per token (unlike Gumbel or exponential races, which draw a vocabulary's
  worth) and a tiny change in `p` only changes the token when `u` falls within that change of a CDF step.
* Processing order (vLLM's): `logit_bias`, penalties (repetition over prompt + output, then frequency and
  presence over the output), forced/banned tokens (reasoning budget, `min_tokens`), the grammar's mask (grammar.py), temperature, top-k,
  top-p, min-p, softmax. Temperature 0 is greedy (argmax of the processed logits). Penalties see the
  output as it would be at that position, drafts included, so speculative decoding stays exact.
* **Logprobs are the raw model's** (`log_softmax` of the unprocessed logits, vLLM's default
  `raw_logprobs`), for the sampled token and the top-n, with the sampled token's rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .grammar import StructuredOutputs
from .native import argmax as native_argmax

_EPS = 1e-5          # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


@dataclass
class SamplingParams:
    """Per-request generation settings. Invalid values raise `ValueError` with the field named."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16         # None: up to the model's context length
    min_tokens: int = 0
    stop: str | int | Sequence[str | int] | None = None   # strings and/or token ids
    stop_token_ids: Sequence[int] | None = None
    presence_penalty: float = 0.0       # minus this from every token already in the output
    frequency_penalty: float = 0.0      # minus this times the token's count in the output
    repetition_penalty: float = 1.0     # tokens in prompt or output: logit / this if > 0, else logit * this
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit (clamped to [-100, 100])
    ignore_eos: bool = False
    logprobs: int | None = None         # None: off; k >= 0: the sampled token's logprob + top-k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    reasoning_mode: str = "regular"     # 'off' | 'regular' | 'medium' (see reasoning.py)
    thinking_budget: int | None = None  # max tokens inside <think> before </think> is forced
    answer_prefix_ids: Sequence[int] | None = None  # forced at the start of the answer (see engine._constraint)
    structured_outputs: StructuredOutputs | None = None   # the answer follows this grammar (grammar.py)
    banned_token_ids: Sequence[int] | None = None   # never generated (the server bans <tool_call> without tools)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            bad("n", "must be an integer >= 1")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be a dict of token id -> bias")
            for t, b in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    bad("logit_bias", "keys must be token ids >= 0")
                if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
                    bad("logit_bias", "values must be finite numbers")
            self.logit_bias = {t: min(100.0, max(-100.0, float(b))) for t, b in self.logit_bias.items()} or None
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad("top_k", "must be an integer >= 1, or 0 / -1 to disable")
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "must be an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or self.logprobs < 0):
            bad("logprobs", "must be an integer >= 0 or None")
        if self.reasoning_mode not in ("off", "regular", "medium"):
            bad("reasoning_mode", "must be 'off', 'regular' or 'medium'")
        if self.thinking_budget is not None and (not isinstance(self.thinking_budget, int)
                                                 or isinstance(self.thinking_budget, bool) or self.thinking_budget < 0):
            bad("thinking_budget", "must be an integer >= 0 or None")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            bad("structured_outputs", "must be a StructuredOutputs or None")
        for name in ("stop_token_ids", "answer_prefix_ids", "banned_token_ids"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (list, tuple, set, frozenset)):
                bad(name, "must be a list of token ids or None")
        if self.stop is not None and not isinstance(self.stop, (str, int, list, tuple, set, frozenset)):
            bad("stop", "must be a string, a token id, or a list of them")
        for name in ("answer_prefix_ids", "banned_token_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, list(getattr(self, name)))
                if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in getattr(self, name)):
                    bad(name, "must be a list of token ids >= 0")
        # split `stop` into strings and token ids
        stop = self.stop
        stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        ids = list(self.stop_token_ids or [])
        strs = []
        for s in stop:
            if isinstance(s, bool) or not isinstance(s, (str, int)):
                raise ValueError(f"SamplingParams.stop entries must be strings or token ids, got {s!r}")
            if isinstance(s, int):
                ids.append(s)
            elif s == "":
                raise ValueError("SamplingParams.stop contains an empty string")
            else:
                strs.append(s)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"SamplingParams.stop_token_ids entries must be token ids >= 0, got {i!r}")
        self.stop = strs
        self.stop_token_ids = ids

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    @property
    def adjusts_logits(self) -> bool:
        """Whether logit_bias or a penalty is set (their logit changes depend on the sequence so far)."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0 \
            or self.repetition_penalty != 1


@dataclass
class Logprob:
    logprob: float
    rank: int                        # 1 = most likely token
    decoded_token: str | None = None


@dataclass
class Penalties:
    """What a row's logit_bias and penalties need: its params, the distinct prompt tokens (a tensor the
    engine keeps per sequence; None without a repetition penalty) and the output so far."""
    params: SamplingParams
    prompt_tokens: torch.Tensor | None
    output_ids: Sequence[int]

    def apply(self, row: torch.Tensor) -> None:
        """Adjust one row of logits [V] in place (vLLM's order: bias, repetition, frequency, presence)."""
        p, V = self.params, row.shape[0]
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < V]
            row[ids] += torch.tensor([p.logit_bias[t] for t in ids], dtype=row.dtype)
        if p.repetition_penalty == 1 and not (p.frequency_penalty or p.presence_penalty):
            return
        out = torch.tensor(list(self.output_ids), dtype=torch.long)
        if p.repetition_penalty != 1:
            parts = [out] + ([self.prompt_tokens] if self.prompt_tokens is not None else [])
            seen = torch.cat(parts).unique()
            v = row[seen]
            row[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and out.numel():
            counts = torch.bincount(out, minlength=V)[:V].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


@dataclass
class RowConstraint:
    """Per-row logit processing before temperature: bias and penalties, then one forced token or banned
    tokens, then the grammar's mask (`allowed`, bool [V]: everything else gets -inf)."""
    forced: int | None = None
    banned: tuple[int, ...] = ()
    penalties: Penalties | None = None
    allowed: torch.Tensor | None = None


def constrain(logits: torch.Tensor, rows: Sequence[RowConstraint | None]) -> torch.Tensor:
    """Apply each row's bias/penalties and forced/banned tokens to logits [N, V] (a copy is made only if
    some row is constrained)."""
    if not any(r is not None and (r.forced is not None or r.banned or r.penalties is not None
                                  or r.allowed is not None) for r in rows):
        return logits
    logits = logits.clone()
    for i, r in enumerate(rows):
        if r is None:
            continue
        if r.penalties is not None:
            r.penalties.apply(logits[i])
        if r.forced is not None:
            keep = logits[i, r.forced].clone()
            logits[i] = -math.inf
            logits[i, r.forced] = keep if math.isfinite(keep) else 0.0
            continue
        banned = list(r.banned)
        # banned tokens against a grammar that allows nothing else (min_tokens at the end of a grammar, a banned
        # token the grammar requires there): the grammar wins
        if banned and (r.allowed is None or int(r.allowed.sum()) > int(r.allowed[banned].sum())):
            logits[i, banned] = -math.inf
        if r.allowed is not None:
            logits[i].masked_fill_(~r.allowed, -math.inf)
    return logits


def probabilities(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Sampling distribution [N, V] (fp32) from constrained logits [N, V]: temperature, top-k, top-p,
    min-p (rows whose params are greedy get a one-hot argmax)."""
    N, V = logits.shape
    temps = torch.tensor([max(p.temperature, _EPS) for p in params], dtype=torch.float32)
    x = logits.float() / temps[:, None]
    top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(tp < 1 for tp in top_p):
        sorted_x, order = x.sort(dim=-1, descending=True)
        mask = torch.zeros_like(sorted_x, dtype=torch.bool)
        if any(top_k):
            k = torch.tensor([kk if kk else V for kk in top_k])
            mask |= torch.arange(V)[None, :] >= k[:, None]
            sorted_x = sorted_x.masked_fill(mask, -math.inf)
        if any(tp < 1 for tp in top_p):
            p_sorted = sorted_x.softmax(-1)
            before = p_sorted.cumsum(-1) - p_sorted                  # mass strictly before each token
            mask |= before > torch.tensor(top_p)[:, None]            # the first token is always kept
        x = x.scatter(-1, order, sorted_x.masked_fill(mask, -math.inf))
    probs = x.softmax(-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        thresh = torch.tensor(min_p)[:, None] * probs.max(-1, keepdim=True).values
        probs = probs.masked_fill(probs < thresh, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        g = torch.tensor(greedy)
        probs[g] = torch.nn.functional.one_hot(logits[g].argmax(-1), V).float()
    return probs


def uniforms(gens: Sequence[torch.Generator], n: int = 1) -> torch.Tensor:
    """[len(gens), n] float64 uniforms in [0, 1), row i drawn from generator i."""
    return torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in gens]) if gens else \
        torch.zeros(0, n, dtype=torch.float64)


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: probs [N, V] (unnormalised is fine), u [N] in [0, 1) -> tokens [N]."""
    cdf = probs.double().cumsum(-1)
    x = (u.double() * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, x, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)
    bad = probs.gather(-1, idx[:, None])[:, 0] <= 0          # only at the top edge through float rounding
    if bool(bad.any()):
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
        idx = torch.where(bad, last, idx)
    return idx


def choose(logits: torch.Tensor, params: Sequence[SamplingParams], gens: Sequence[torch.Generator],
           rows: Sequence[RowConstraint | None]) -> tuple[list[int], torch.Tensor | None]:
    """One token per row of logits [N, V]: argmax for greedy rows, a seeded draw (one uniform from the
    row's generator) otherwise. Returns the tokens and the sampling distributions (None if all greedy;
    greedy rows get one-hot rows)."""
    logits = constrain(logits, rows)
    top = native_argmax(logits)
    if all(p.greedy for p in params):
        return top if top is not None else logits.argmax(-1).tolist(), None
    out = torch.tensor(top) if top is not None else logits.argmax(-1)
    probs = probabilities(logits, params)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    u = uniforms([gens[i] for i in sampled])[:, 0]
    out[sampled] = sample_rows(probs[sampled], u)
    return out.tolist(), probs


def logprobs_for(logits: torch.Tensor, tokens: Sequence[int], top_n: Sequence[int | None],
                 decode=None) -> list[dict[int, Logprob] | None]:
    """Raw-model logprobs for rows of logits [N, V]: the chosen token (with its rank) and the top-n."""
    out: list[dict[int, Logprob] | None] = [None] * len(tokens)
    want = [i for i, n in enumerate(top_n) if n is not None]
    if not want:
        return out
    lp = torch.log_softmax(logits[want].float(), -1)
    for j, i in enumerate(want):
        row, tok = lp[j], tokens[i]
        chosen = float(row[tok])
        rank = int((row > row[tok]).sum()) + 1
        d: dict[int, Logprob] = {}
        if top_n[i]:
            vals, ids = row.topk(min(top_n[i], row.shape[0]))
            for r, (v, t) in enumerate(zip(vals.tolist(), ids.tolist())):
                d[t] = Logprob(v, r + 1, decode([t]) if decode else None)
        d[tok] = Logprob(chosen, rank, decode([tok]) if decode else None)
        out[i] = d
    return out


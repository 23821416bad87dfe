"""Grouped-query attention (`*` layers) with no positional encoding (NoPE).

Nemotron-H attention has no RoPE (the `rope_theta` in configs is a dead field), no bias, no QK-norm:
q/k/v/o projections, softmax(q k^T / sqrt(head_dim)) with a causal mask, KV head j serving query heads
j*(n_q/n_kv) .. (j+1)*(n_q/n_kv)-1. The Mamba layers carry position. `scaled_dot_product_attention`
with `enable_gqa` avoids materialising repeated K/V, and its fused CPU kernel avoids a T x T score
matrix for plain causal prefill. Chunked prefill (new queries after a cached prefix) runs the fused kernel
on the prefix and on the chunk separately and merges them by log-sum-exp (`prefix_causal_attention`), so a
128K context never materialises a [chunk, 128K] mask or score matrix on CPU; ragged batches (rows at
different positions: continuous-batching decode, speculative verification) keep an explicit bool mask.

`k_scale` / `v_scale` (fp32 numbers, None by default) are a checkpoint's FP8 KV-cache scales (ModelOpt's
`...k_proj.k_scale` / `...v_proj.v_scale`): set, they declare that this layer's K/V are stored in FP8 E4M3. The
module itself never applies them; the cache does (`HybridCache.for_model`, quantize on write, dequantize on read).
They are plain attributes, not buffers, so `.to(dtype)` never rounds them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronConfig
from .cache import PrefixCausal


class Attention(nn.Module):
    def __init__(self, config: NemotronConfig):
        super().__init__()
        c = config
        self.n_q, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_q * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_q * self.head_dim, c.hidden_size, bias=False)
        self.k_scale: float | None = None
        self.v_scale: float | None = None

    def forward(self, x: torch.Tensor, kv=None, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d]. `kv` is a callable (k, v) -> (keys, values, mask) storing the new k/v in a cache
        (see `CacheRows.append_kv`); `pad_mask` [B, T] (1 = token) hides padded keys."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_q, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        mask = None
        if kv is not None:
            k, v, mask = kv(k, v)
        if pad_mask is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            keep = causal[None, None] & pad_mask.bool()[:, None, None, :]
            mask = keep | torch.eye(T, dtype=torch.bool, device=x.device)  # padded queries see themselves
        if isinstance(mask, PrefixCausal):
            if q.device.type == "cpu":
                o = prefix_causal_attention(q, k.to(q.dtype), v.to(q.dtype), mask.prefix)
                return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            mask = prefix_causal_mask(T, k.shape[2], mask.prefix, x.device)
        if mask is None and T == 1 and self.n_q != self.n_kv:
            # one query per row sees every key: fold each KV group's query heads into the query axis, so
            # the fused kernel reads the cached K/V once per KV head (enable_gqa reads them once per query
            # head: 2x slower at 16K+ keys on CPU, where decode attention is memory-bound)
            rep = self.n_q // self.n_kv
            o = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, rep, self.head_dim), k.to(q.dtype),
                                               v.to(q.dtype))
            return self.o_proj(o.reshape(B, 1, -1))
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           is_causal=mask is None and T > 1, enable_gqa=self.n_q != self.n_kv)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def prefix_causal_mask(T: int, S: int, prefix: int, device) -> torch.Tensor:
    """Bool mask [1, 1, T, S]: query i (position prefix + i) sees keys j <= prefix + i."""
    return (torch.arange(S, device=device)[None, :] <= prefix + torch.arange(T, device=device)[:, None])[None, None]


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """Attention of T new queries (positions prefix..prefix+T-1) over `prefix` cached keys (all visible)
    and the T new keys (causal), without materialising a [T, S] mask or score matrix: the fused CPU flash
    kernel runs on each part and returns its log-sum-exp, and the two partial softmaxes are merged exactly
    (out = (e^lse1 out1 + e^lse2 out2) / (e^lse1 + e^lse2)). q [B, Hq, T, D], k/v [B, Hkv, prefix + T, D]
    (GQA: the prefix part folds each group's query heads into the query axis, so cached K/V are never
    repeated; the causal part is T keys long and repeats them)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    scale = 1.0 / math.sqrt(D)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    kn, vn = k[:, :, prefix:prefix + T], v[:, :, prefix:prefix + T]
    if rep > 1:
        kn, vn = kn.repeat_interleave(rep, dim=1), vn.repeat_interleave(rep, dim=1)
    o2, l2 = flash(q, kn, vn, 0.0, True, scale=scale)                      # [B, Hq, T, D], [B, Hq, T]
    if prefix == 0:
        return o2
    qg = q.reshape(B, Hkv, rep * T, D)                                      # heads j*rep..j*rep+rep-1 share kv j
    o1, l1 = flash(qg, k[:, :, :prefix], v[:, :, :prefix], 0.0, False, scale=scale)
    o1, l1 = o1.reshape(B, Hq, T, D), l1.reshape(B, Hq, T)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    o = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / (w1 + w2)[..., None]
    return o.to(q.dtype)

"""Grouped-query attention (`*` layers) with no positional encoding (NoPE).

Nemotron-H attention has no RoPE (the `rope_theta` in configs is a dead field), no bias, no QK-norm:
q/k/v/o projections, softmax(q k^T / sqrt(head_dim)) with a causal mask, KV head j serving query heads
j*(n_q/n_kv) .. (j+1)*(n_q/n_kv)-1. The Mamba layers carry position. `scaled_dot_product_attention`
with `enable_gqa` avoids materialising repeated K/V, and its fused CPU kernel avoids a T x T score
matrix for plain causal prefill.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronConfig


class Attention(nn.Module):
    def __init__(self, config: NemotronConfig):
        super().__init__()
        c = config
        self.n_q, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_q * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_q * self.head_dim, c.hidden_size, bias=False)

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
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           is_causal=mask is None and T > 1, enable_gqa=self.n_q != self.n_kv)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

"""Mamba-2 mixer (`M` layers): in_proj -> causal depthwise conv -> selective SSM (SSD) -> gated norm -> out_proj.

Weight names and shapes are the checkpoint's (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm`,
`out_proj`). `in_proj` output splits as [z | xBC | dt]; `xBC` = [x | B | C]; head h reads B/C group
h // (H / G). The SSM runs in fp32 whatever the weight dtype.

Whole sequences use the chunked state-space-duality scan (`ssd_scan`, Mamba-2 paper, Listing 1):
an intra-chunk quadratic term plus an inter-chunk recurrence over chunk states, exact for any length
(not only multiples of `chunk_size`), with an optional initial state and the final state returned, so
chunked prefill continues exactly where the previous chunk stopped. One new token uses the recurrent
update (`ssm_step`); both give the same numbers up to fp32 rounding. The scan's contractions are batched matmuls in
head-major layouts (`_ssd_segment`) and the prefill conv a time-major K-tap sum (`causal_conv`): the einsum /
oneDNN forms spent most of a CPU prefill's Mamba time in permute copies and transposes (issue 21).

Speculative verification (`record=True`) runs a few tokens through the recurrent update one at a time
and returns the conv window and SSM state after *every* position, so the engine can keep the state of
the last accepted draft token (vLLM and SGLang keep one state per draft position the same way). Few-token
calls with a state (decode, verify) compute the depthwise conv as a weighted sum over K taps: oneDNN's
conv1d costs ~0.25 ms per call at T=1 on CPU, the sum a few microseconds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronConfig
from .norm import GatedRMSNorm


def segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum(x[..., j+1 : i+1]) for i >= j, -inf above the diagonal (stable: no subtraction)."""
    L = x.shape[-1]
    x = x[..., None].expand(*x.shape, L)
    x = x.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), -1), 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), 0), -math.inf)


SEGMENT_CHUNKS = 32      # ssd_scan works on segments of this many chunks (2048 tokens at chunk_size 64)


def ssd_scan(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """Chunked selective scan without the D skip.

    x [b, l, h, p], dt [b, l, h] (after softplus), A [h], B/C [b, l, g, n]; all computed in fp32.
    Returns y [b, l, h, p] (fp32) and the final state [b, h, p, n] (fp32).

    Long inputs are scanned in segments of `SEGMENT_CHUNKS` chunks, each starting from the previous one's
    final state (the same recurrence the inter-chunk step computes), so the temporaries stay O(segment)
    -- the inter-chunk decay matrix is [c, c] in the number of chunks c -- and a 128K-token forward
    needs no more scratch memory than a 2K one.
    """
    seg = SEGMENT_CHUNKS * chunk_size
    l = x.shape[1]
    if l <= seg:
        return _ssd_segment(x, dt, A, B, C, chunk_size, initial_state)
    ys, state = [], initial_state
    for s in range(0, l, seg):
        y, state = _ssd_segment(x[:, s:s + seg], dt[:, s:s + seg], A, B[:, s:s + seg], C[:, s:s + seg],
                                chunk_size, state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def decay_matrix_t(a: torch.Tensor) -> torch.Tensor:
    """exp(segsum(a)) transposed without its mask, for a [..., L]: out[..., s, t] = exp(sum(a[..., s+1 : t+1]))
    for t >= s and 1 below the diagonal (the caller masks the group-level C.B, r times smaller). The masked running
    sum goes along the contiguous last axis (segsum's runs down the rows) and is the same sequential sum, so
    the values on and above the diagonal equal segsum's."""
    L = a.shape[-1]
    later = torch.ones(L, L, dtype=torch.bool, device=a.device).triu(1)            # [s, t]: t > s
    return torch.where(later, a[..., None, :], 0.0).cumsum(-1).exp()


def _ssd_segment(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """One segment of `ssd_scan`. Head-major layouts ([b, h, c, L, .]) make every contraction a batched matmul on
    contiguous or transposed operands (the einsum form copied a permuted operand per term); the per-head decays
    are folded into B and C as they are broadcast from their g groups to the h heads, which is also the one
    copy that broadcast needs."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    pad = (-l) % chunk_size
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if pad:
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c, L = (l + pad) // chunk_size, chunk_size
    xdt = (x * dt[..., None]).transpose(1, 2).contiguous().view(b, h, c, L, p)
    a = (dt * A.float()).transpose(1, 2).reshape(b, h, c, L)
    a_cum = torch.cumsum(a, dim=-1)                                        # [b, h, c, L]
    B = B.transpose(1, 2).contiguous().view(b, g, 1, c, L, n)
    C = C.transpose(1, 2).contiguous().view(b, g, 1, c, L, n)
    # 1. intra-chunk (diagonal blocks): y_t = sum_{s<=t} C_t.B_s exp(a_{s+1..t}) dt_s x_s, weights built as [s, t]
    Wt = (B @ C.transpose(-1, -2)).triu() * decay_matrix_t(a).view(b, g, r, c, L, L)  # [b, g, r, c, L(s), L(t)]
    y = Wt.view(b * h * c, L, L).transpose(-1, -2) @ xdt.view(b * h * c, L, p)        # [bhc, L, p]
    # 2. state of each chunk at its end, from its own inputs: sum_s (dt_s x_s) (exp(a_{s+1..end}) B_s)^T
    B_end = B * torch.exp(a_cum[..., -1:] - a_cum).view(b, g, r, c, L, 1)              # [b, g, r, c, L, n]
    states = xdt.transpose(-1, -2) @ B_end.reshape(b, h, c, L, n)                       # [b, h, c, p, n]
    # 3. recurrence over chunks (with the initial state as chunk "-1"): the state entering each chunk, and the final
    init = states.new_zeros(b, h, 1, p * n) if initial_state is None else \
        initial_state.float().reshape(b, h, 1, p * n)
    states = torch.cat([init, states.view(b, h, c, p * n)], dim=2)        # [b, h, c+1, p*n]
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))        # [b, h, c+1, c+1]
    entering = chunk_decay[:, :, :c] @ states                              # [b, h, c, p*n]
    final = (chunk_decay[:, :, c:] @ states).view(b, h, p, n)
    # 4. contribution of the state entering each chunk: (exp(a_{start..t}) C_t) . state_in, added in place
    C_in = C * torch.exp(a_cum).view(b, g, r, c, L, 1)                    # [b, g, r, c, L, n]
    y = y.baddbmm_(C_in.reshape(b * h * c, L, n), entering.view(b * h * c, p, n).transpose(-1, -2))
    y = y.view(b, h, c * L, p).transpose(1, 2)[:, :l]                     # [b, l, h, p]
    return y, final


def causal_conv(window: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv as a K-tap sum in time-major layout, accumulated in fp32 from the bias:
    window [B, K-1+T, C], w [C, 1, K] -> [B, T, C] in w's dtype. oneDNN's conv1d wants [B, C, T] (two
    transposes of the in_proj output); each tap is a contiguous [C] row, so the broadcasts vectorise."""
    K, dtype = w.shape[-1], w.dtype
    T = window.shape[1] - (K - 1)
    w = w[:, 0].t().float().contiguous()                                   # [K, C]: contiguous per tap (vectorised)
    x = window.float()
    out = x[:, :T] * w[0] if bias is None else torch.addcmul(bias.float(), x[:, :T], w[0])
    for k in range(1, K):
        out = out.addcmul_(x[:, k:k + T], w[k])
    return out.to(dtype)


def ssm_step(state, x, dt, A, B, C, inplace: bool = False):
    """One recurrent step. state [b, h, p, n] fp32, x [b, h, p], dt [b, h], B/C [b, g, n] -> y [b, h, p], new state.
    Heads are viewed as [g, h/g] so B and C broadcast over their group (no repeat_interleave). `inplace`
    (decode over a cache) updates `state` itself: 3 passes over the state instead of 7 and no copy back."""
    b, h, p, n = state.shape
    g = B.shape[1]
    r = h // g
    dt = dt.float()
    dA = torch.exp(dt * A.float()).view(b, g, r, 1, 1)
    dtx = (dt[..., None] * x.float()).view(b, g, r, p, 1)
    Bv = B.float().view(b, g, 1, 1, n)
    if inplace:
        s = state.view(b, g, r, p, n)
        s.mul_(dA).addcmul_(dtx, Bv)
    else:
        s = torch.addcmul(state.float().view(b, g, r, p, n) * dA, dtx, Bv)
    y = (s * C.float().view(b, g, 1, 1, n)).sum(-1).view(b, h, p)      # 4-6x faster than an N=1 bmm on CPU
    return y, s.view(b, h, p, n)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: NemotronConfig):
        super().__init__()
        c = config
        self.config = c
        self.num_heads, self.head_dim = c.mamba_num_heads, c.mamba_head_dim
        self.n_groups, self.state_size = c.n_groups, c.ssm_state_size
        self.d_inner, self.conv_dim, self.kernel = c.mamba_d_inner, c.mamba_conv_dim, c.conv_kernel
        self.in_proj = nn.Linear(c.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=c.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.conv_kernel, groups=self.conv_dim,
                                bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, c.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, c.hidden_size, bias=c.use_bias)

    def forward(self, u: torch.Tensor, state=None, pad_mask: torch.Tensor | None = None, record: bool = False):
        """u [B, T, d]. `state` is None (whole sequence from zero state) or (conv [B, C, K-1], ssm [B, H, P, N]);
        returns (out, new_state or None). `pad_mask` [B, T] (1 = token) zeroes padded positions.
        With `record` (needs a state) the new state is per position: (conv [B, T, C, K-1], ssm [B, T, H, P, N]),
        entry t being the state after token t."""
        Bsz, T, _ = u.shape
        if record and state is None:
            raise ValueError("record=True needs a cached state (speculative verification runs over a cache)")
        if state is not None and pad_mask is None and (T == 1 or record):
            return self._recurrent(u, state, record)
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.state_size
        if pad_mask is not None:
            u = u * pad_mask[..., None].to(u.dtype)
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, H], dim=-1)
        # causal depthwise conv over time, continuing from the cached window (zeros without a state)
        hist = xBC.new_zeros(Bsz, self.kernel - 1, self.conv_dim) if state is None else \
            state[0].transpose(1, 2).to(xBC.dtype)
        window = torch.cat([hist, xBC], dim=1)                             # [B, K-1+T, C]
        xBC = F.silu(causal_conv(window, self.conv1d.weight, self.conv1d.bias)).to(u.dtype)   # [B, T, C]
        new_conv = None if state is None else window[:, T:].transpose(1, 2)
        if pad_mask is not None:
            xBC = xBC * pad_mask[..., None].to(xBC.dtype)
        x, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        A = -torch.exp(self.A_log.float())
        dt = self._dt(dt)
        x = x.reshape(Bsz, T, H, P)
        ssm0 = None if state is None else state[1]
        y, ssm = ssd_scan(x, dt, A, B.view(Bsz, T, G, N), C.view(Bsz, T, G, N), self.config.chunk_size, ssm0)
        y = x.float() * self.D.float()[:, None] + y         # x first: the sum comes out [B, T, H, P], not head-major
        y = self.norm(y.reshape(Bsz, T, self.d_inner), z)
        out = self.out_proj(y.to(u.dtype))
        return out, (None if state is None else (new_conv, ssm))

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.config.mamba_dt_clamp:
            dt = dt.clamp(min=self.config.time_step_min)
        lo, hi = self.config.time_step_limit
        if lo > 0 or math.isfinite(hi):
            dt = dt.clamp(min=lo, max=hi)
        return dt

    def _recurrent(self, u: torch.Tensor, state, record: bool):
        """Token-by-token path over a cached state (decode, speculative verify): the conv as a K-tap
        sum over the cached window, then `ssm_step` per token. One token updates the given fp32 SSM
        state in place (it is the cache's storage, or the cache's gathered copy that is written back).
        With `record` the conv window and SSM state after every token are returned ([B, T, C, K-1],
        [B, T, H, P, N])."""
        Bsz, T, _ = u.shape
        H, P, G, N, K = self.num_heads, self.head_dim, self.n_groups, self.state_size, self.kernel
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, H], dim=-1)
        w = self.conv1d.weight                                                    # [C, 1, K]
        window = torch.cat([state[0].to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
        conv = (window.to(w.dtype).unfold(-1, K, 1) * w).sum(-1)                  # [B, C, T]
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias[:, None]
        xBC = F.silu(conv).to(u.dtype).transpose(1, 2)                            # [B, T, C]
        x, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        dt = self._dt(dt)
        A = -torch.exp(self.A_log.float())
        ssm, ys, states = state[1], [], []
        inplace = T == 1 and not record and ssm.dtype == torch.float32 and ssm.is_contiguous()
        for t in range(T):
            y, ssm = ssm_step(ssm, x[:, t].reshape(Bsz, H, P), dt[:, t], A, B[:, t].reshape(Bsz, G, N),
                              C[:, t].reshape(Bsz, G, N), inplace=inplace)
            ys.append(y)
            states.append(ssm)
        y = ys[0][:, None] if T == 1 else torch.stack(ys, 1)                      # [B, T, H, P]
        y = y + self.D.float()[:, None] * x.reshape(Bsz, T, H, P).float()
        out = self.out_proj(self.norm(y.reshape(Bsz, T, self.d_inner), z).to(u.dtype))
        if record:
            return out, (window.unfold(-1, K - 1, 1)[:, :, 1:].transpose(1, 2), torch.stack(states, 1))
        return out, (window[:, :, T:], ssm)

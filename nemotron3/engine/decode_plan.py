"""Small-batch decode fast path: one new token for each of a few cache slots, with as few ops as possible.

At batch 1 a decode step is ~64 GEMVs and a few hundred tiny element-wise ops. On CPU the GEMVs are
memory-bound and the tiny ops are pure framework overhead (~3-10 us each whatever their size), so the step
is the generic forward rewritten for this shape, twice:

* **the C kernel** (`decode_step.c`, `decode_layers.c`, `decode_mat.c`, `decode_pool.c`, built and described
  by `native.py`): the whole backbone in one call for up to `engine.PLAN_MAX_ROWS` rows, each weight read once for all
  rows, **in place and in its stored format** ([out, in] fp32, bf16, FP8 E4M3 per-tensor, NVFP4 codes + E4M3
  block scales + FP32 tensor scale, decoded in registers): no copies, so resident memory is the model plus
  the cache; N pthreads split every phase, bitwise independent of N. Compiled on first use with the system
  C compiler, called through ctypes.
* **the torch ops** (`_step_torch`, where no compiler is available or NEMOTRON3_NATIVE=0): [in, out]-contiguous
  fp32 copies of the weights (MKL's GEMV on them is ~1.5-2x `F.linear`'s), pre-norm RMSNorm weights folded
  into the following matrix (the RMS scale becomes the matmul's `alpha`), matrices reading the same input
  concatenated (q|k|v; router|fc1_latent|shared up), those writing the residual stacked into one `addmm`
  (fc2_latent|shared down), the top-k experts run on views of the [in, out] expert copies. ~600 ATen calls
  per token: ~3x slower than the kernel at pico size; the copies cap it at MAX_WEIGHT_BYTES.

K/V are read and written as the cache stores them: fp32, bf16 or FP8 E4M3 (`HybridCache.kv_store` /
`kv_load`; the kernel writes the same bytes, `x / scale` saturated to +-448 and rounded to nearest even, and
reads the codes' values times the layer's scale: a 256-entry table, or F16C 8 codes at a time).

Numerics are the generic path's up to fp32 summation order (tests compare both with the full forward at
1e-4). The plan is rebuilt whenever a weight changes (its identity or in-place version), as between RL
updates. Anything it does not cover (speculation, bf16 activations, custom expert functions) runs the
generic forward.
"""
from __future__ import annotations

import ctypes
import math
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.linear import BF16Linear, FP8Linear, NVFP4Linear
from ..quant.quantize import NVFP4Experts
from ..model.attention import Attention
from ..model.cache import FP8 as FP8_KV
from ..model.mamba2 import Mamba2Mixer
from ..model.moe import Experts, LatentMoE, MLP, TopkRouter
from ..model.norm import GatedRMSNorm, RMSNorm


LINEARS = (nn.Linear, NVFP4Linear, FP8Linear, BF16Linear)
KV_BYTES = {torch.float32: 4, torch.bfloat16: 2, FP8_KV: 1}     # K/V storage the C kernel reads and writes


def _weight(mod) -> torch.Tensor:
    """A linear's (or the router's) [out, in] weight in fp32. A W4A16 / W8A16 module gives its dequantized codes:
    exactly the fp32 weight its own forward multiplies fp32 activations by."""
    deq = getattr(mod, "dequantized_weight", None)
    return (deq(torch.float32) if deq is not None else mod.weight).detach().float()


def _experts(experts, proj: str) -> torch.Tensor:
    """Routed experts' `proj` ("up_proj" [E, I, l] / "down_proj" [E, l, I]) in fp32, dequantized if NVFP4."""
    if isinstance(experts, NVFP4Experts):
        return torch.stack([experts.dequantized(proj, e) for e in range(experts.n_experts)])
    return getattr(experts, proj).detach().float()


def _t(mod, scale: torch.Tensor | None = None) -> torch.Tensor:
    """[out, in] weight -> [in, out]-contiguous fp32 copy, rows optionally scaled (a folded norm weight)."""
    wt = _weight(mod).t()
    if scale is not None:
        wt = scale.detach().float()[:, None] * wt
    return wt.contiguous()


def _bias(*mods) -> torch.Tensor | None:
    if all(getattr(m, "bias", None) is None for m in mods):
        return None
    return torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                      for m in mods])[None]


_VERSION = attrgetter("_version")
MAX_WEIGHT_BYTES = 4 << 30      # the plan copies the weights: no plan for models larger than this


def _tracked(model) -> list[torch.Tensor]:
    """The tensors the plan's copies are made from: parameters and the quantized modules' codes/scales."""
    return list(model.parameters()) + [b for b in model.buffers()
                                       if b.dtype in (torch.uint8, torch.float8_e4m3fn, torch.bfloat16)]


def supported(model) -> bool:
    """The plan covers fp32-activation CPU models built from the stock modules, their linears and routed
    experts either fp32 or W4A16 NVFP4 / W8A16 FP8 (dequantized once into the plan's fp32 copies; not custom
    expert functions), whose fp32 weights fit in memory comfortably (<= MAX_WEIGHT_BYTES)."""
    p = model.lm_head.weight
    if model.dtype != torch.float32 or p.device.type != "cpu" or model.config.mamba_ssm_cache_dtype != "float32":
        return False
    packed = sum(b.numel() for b in model.buffers() if b.dtype == torch.uint8)      # 2 NVFP4 codes per byte
    if native_library() is None and (sum(q.numel() for q in _tracked(model)) + packed) * 4 > MAX_WEIGHT_BYTES:
        return False                                 # the torch ops' fp32 [in, out] copies would not fit
    for layer in model.backbone.layers:
        m = layer.mixer
        if type(layer.norm) is not RMSNorm:
            return False
        if layer.kind == "M":
            ok = type(m) is Mamba2Mixer and type(m.in_proj) in LINEARS and type(m.out_proj) in LINEARS \
                and type(m.norm) is GatedRMSNorm
        elif layer.kind == "*":
            ok = type(m) is Attention and all(type(getattr(m, n)) in LINEARS
                                              for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        elif layer.kind == "E":
            ok = type(m) is LatentMoE and type(m.gate) is TopkRouter \
                and (type(m.experts) is NVFP4Experts or (type(m.experts) is Experts and m.experts.linear_fn is None)) \
                and not m.record_router and type(m.shared_experts) is MLP \
                and all(type(q) in LINEARS for q in (m.shared_experts.up_proj, m.shared_experts.down_proj)) \
                and (m.fc1_latent_proj is None or (type(m.fc1_latent_proj) in LINEARS
                                                   and type(m.fc2_latent_proj) in LINEARS))
        else:
            ok = type(m) is MLP and type(m.up_proj) in LINEARS and type(m.down_proj) in LINEARS
        bf16_ok = (m.experts.up_proj, m.experts.down_proj) if layer.kind == "E" else ()
        if not ok or any(q.dtype != torch.float32 and not (q.dtype == torch.bfloat16 and any(q is b for b in bf16_ok))
                         for q in m.parameters()):
            return False
    return True


def weights_key(model) -> tuple:
    """Changes whenever a parameter is replaced or updated in place (the plan's copies are then stale).
    Walking the module tree costs ~0.3 ms; `DecodePlan.stale(full=False)` checks only the in-place
    versions of the parameters it was built from (~15 us)."""
    return tuple((id(p), p._version) for p in _tracked(model))


# ---------------------------------------------------------------------- the C kernel: native.py
from .native import F32, _Layer, _Mat, _dense_mat, _mat, default_threads, matmul, native_library  # noqa: E402,F401


class DecodePlan:
    """The decode step of one model: the C kernel's layer descriptions, or the torch ops' prepared weights
    (see the module docstring)."""

    def __init__(self, model, native: bool | None = None, threads: int | None = None):
        """`native`: run `step` in the compiled C kernel (decode_step.c); None = when it builds here,
        True = required (RuntimeError otherwise), False = the torch ops only. `threads`: the kernel's
        threads (None: torch's thread count at each step)."""
        self.model = model
        c = self.config = model.config
        self.d = c.hidden_size
        self.eps = c.layer_norm_epsilon
        self.threads = threads
        self.key = weights_key(model)
        self.params = _tracked(model)
        self.versions = sum(map(_VERSION, self.params))
        self.kinds = [(blk.kind, blk.layer_id) for blk in model.backbone.layers]
        self.emb = model.backbone.embeddings.weight.detach()
        self.norm_f = model.backbone.norm_f.weight.detach().float()
        self.native, self.layers = None, None
        lib = native_library() if native is not False else None
        if native and lib is None:
            raise RuntimeError("the native decode step is not available: no C compiler, a failed build "
                               "(see the warning) or NEMOTRON3_NATIVE=0")
        if lib is not None:
            with torch.no_grad():
                self._build_native(lib.n3_decode_rows)
        if native and self.native is None:
            raise RuntimeError("the native decode step does not take this model's layers (see _native_layer)")
        if self.native is None:
            with torch.no_grad():
                self.layers = [self._layer(blk) for blk in model.backbone.layers]

    def stale(self, full: bool = True) -> bool:
        """Whether a weight changed since the plan was built: `full` also notices replaced parameters."""
        if self.native is not None and any(g.e_score_correction_bias is not b for g, b in self._router_bias):
            return True                      # the C layers point at the replaced buffer's memory
        if full:
            return weights_key(self.model) != self.key
        return sum(map(_VERSION, self.params)) != self.versions      # versions only grow: a sum notices any

    # ------------------------------------------------------------------ building
    def _layer(self, blk):
        m, nw = blk.mixer, blk.norm.weight
        if blk.kind == "M":
            return ("M", blk.layer_id, self._mamba(m, nw))
        if blk.kind == "*":
            W = torch.cat([_t(m.q_proj, nw), _t(m.k_proj, nw), _t(m.v_proj, nw)], 1)
            return ("*", blk.layer_id, (W.contiguous(), _t(m.o_proj), m.n_q, m.n_kv, m.head_dim))
        if blk.kind == "E":
            # W1 = [router | fc1_latent | shared up] (one GEMV on the normed input), W2 = [fc2_latent ; shared
            # down] (one addmm onto the residual). Without a latent projection the experts read the normed
            # input itself and W1/W2 hold only the router and the shared expert.
            g, lat, up_s = m.gate, m.fc1_latent_proj, m.shared_experts.up_proj
            L = 0 if lat is None else lat.out_features
            mods1 = [up_s] if lat is None else [lat, up_s]
            W1 = torch.cat([_t(g, nw)] + [_t(q, nw) for q in mods1], 1)
            b1 = _bias(*mods1)
            if b1 is not None:
                b1 = torch.cat([torch.zeros(1, g.n_experts), b1], 1)
            mods2 = [m.shared_experts.down_proj] if lat is None else [m.fc2_latent_proj, m.shared_experts.down_proj]
            W2 = torch.cat([_t(q) for q in mods2], 0)
            b2 = None
            for q in mods2:
                if q.bias is not None:
                    b2 = q.bias.detach().float()[None] if b2 is None else b2 + q.bias.detach().float()[None]
            up = _experts(m.experts, "up_proj").transpose(1, 2).contiguous()        # [E, l, I]
            down = _experts(m.experts, "down_proj").transpose(1, 2).contiguous()    # [E, I, l]
            return ("E", blk.layer_id, (W1.contiguous(), b1, W2.contiguous(), b2, up, down, g.n_experts, L, g,
                                        nw.detach().float() if lat is None else None))
        return ("-", blk.layer_id, (_t(m.up_proj, nw), _bias(m.up_proj), _t(m.down_proj),
                                    _bias(m.down_proj)))

    def _mamba(self, m: Mamba2Mixer, nw):
        c = self.config
        w = m.conv1d.weight.detach().float()[:, 0].t()                                   # [K, C]
        if m.conv1d.bias is not None:
            w = torch.cat([w, m.conv1d.bias.detach().float()[None]], 0)                 # bias as a 5th tap
        lo, hi = c.time_step_limit
        return dict(
            W_in=_t(m.in_proj, nw), b_in=_bias(m.in_proj), conv_w=w.contiguous(),
            conv_bias=m.conv1d.bias is not None, one=torch.ones(1, m.conv_dim),
            dt_bias=m.dt_bias.detach().float(), A=-torch.exp(m.A_log.detach().float()),
            D=m.D.detach().float()[:, None],
            W_out=_t(m.out_proj, m.norm.weight), b_out=_bias(m.out_proj),
            dt_min=c.time_step_min if c.mamba_dt_clamp else None,
            limit=(lo, hi) if lo > 0 or math.isfinite(hi) else None,
            sizes=(m.d_inner, m.conv_dim, m.num_heads), H=m.num_heads, P=m.head_dim, G=m.n_groups,
            N=m.state_size, K=m.kernel, gs=m.norm.group_size, geps=m.norm.eps)

    # ------------------------------------------------------------------ running
    def _scale(self, h: torch.Tensor) -> float:
        """RMSNorm factor of the single row h [1, d] (the norm weight is folded into the next matrix)."""
        hv = h[0]
        return 1.0 / math.sqrt(float(torch.dot(hv, hv)) / self.d + self.eps)

    def step(self, token: int, cache, slot: int) -> torch.Tensor:
        """Feed `token` to cache slot `slot` (advancing its length); return the backbone output after
        `norm_f`, [1, d] fp32."""
        return self.step_rows([token], cache, [slot])

    @torch.no_grad()
    def step_rows(self, tokens: list[int], cache, slots: list[int]) -> torch.Tensor:
        """One new token for each of B sequences (row b: `tokens[b]` into slot `slots[b]`, at that slot's
        own length); returns [B, d]. The C kernel takes all rows in one call (each weight read once); the
        torch ops run the rows one after the other."""
        return self.step_logits(tokens, cache, slots)[0]

    @torch.no_grad()
    def step_logits(self, tokens: list[int], cache, slots: list[int], head=None):
        """`step_rows`, and with `head` (the lm_head) its logits [B, V] computed in the same kernel call where
        the kernel reads the head's format (else None: the caller computes them). Returns (h, logits)."""
        if len(tokens) != len(slots) or not tokens:
            raise ValueError(f"{len(tokens)} tokens for {len(slots)} slots: need one token per slot, at least one")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} repeat a slot: each row needs its own")
        V = self.emb.shape[0]
        for slot, token in zip(slots, tokens):
            if not 0 <= slot < cache.num_slots:
                raise ValueError(f"slot {slot} out of range: the cache has slots 0..{cache.num_slots - 1}")
            if not 0 <= token < V:
                raise ValueError(f"token id {token} out of range for a vocabulary of {V}")
        if self.native is not None and cache.dtype == torch.float32:
            out = self._rows_native(tokens, cache, slots, head)
            if out is not None:
                return out
        return torch.cat([self._step_torch(t, cache, s) for t, s in zip(tokens, slots)]), None

    def _grow_kv(self, cache, needed: int) -> None:
        """K/V room for `needed` positions in the backbone's attention layers only (the MTP block's buffers
        stay small: growing them to a 128K context would copy and hold 2 x 64 MiB for nothing)."""
        for kind, i in self.kinds:
            if kind == "*":
                cache.ensure_capacity(needed, layer=i)

    def _step_torch(self, token: int, cache, slot: int) -> torch.Tensor:
        pos = int(cache.lengths[slot])
        self._grow_kv(cache, pos + 1)
        h = self.emb[token:token + 1].float()
        for kind, i, p in self.layers:
            s = self._scale(h)
            if kind == "M":
                h = self._mamba_step(h, s, p, cache.conv[i][slot], cache.ssm[i][slot])
            elif kind == "*":
                h = self._attn_step(h, s, p, cache, i, slot, pos)
            elif kind == "E":
                h = self._moe_step(h, s, p)
            else:
                W1, b1, W2, b2 = p
                a = self._lin_in(h, s, W1, b1).relu_().square_()
                h = torch.addmm(h if b2 is None else h + b2, a, W2)
        cache.lengths[slot] = pos + 1
        return torch.mul(h, self.norm_f).mul_(self._scale(h))

    def _lin_in(self, h, s, W, b):
        return torch.mm(h, W).mul_(s) if b is None else torch.addmm(b, h, W, alpha=s)

    def _mamba_step(self, h, s, p, conv_state, ssm):
        di, C, H = p["sizes"]
        P, G, N, K = p["P"], p["G"], p["N"], p["K"]
        zx = self._lin_in(h, s, p["W_in"], p["b_in"])[0]
        z, xBC, dt = zx[:di], zx[di:di + C], zx[di + C:]
        # window as [K (+1), C]: the tap sum then reduces over a non-inner dim, vectorised along channels
        # (~2x faster than reducing the cache's [C, K-1] layout over its 3-4 wide inner dim)
        parts = [conv_state.t(), xBC[None], p["one"]] if p["conv_bias"] else [conv_state.t(), xBC[None]]
        window = torch.cat(parts, 0)                                          # [K (+1), C]
        xBC = F.silu(torch.linalg.vecdot(window, p["conv_w"], dim=0))
        conv_state.copy_(window[1:K].t())
        dt = F.softplus(dt + p["dt_bias"])
        if p["dt_min"] is not None:
            dt = dt.clamp_(min=p["dt_min"])
        if p["limit"] is not None:
            dt = dt.clamp_(*p["limit"])
        x = xBC[:di].view(H, P)
        gn = G * N
        r = H // G
        dA = torch.exp(dt * p["A"]).view(G, r, 1, 1)
        st = ssm.view(G, r, P, N)
        st.mul_(dA).addcmul_((dt[:, None] * x).view(G, r, P, 1), xBC[di:di + gn].view(G, 1, 1, N))
        y = torch.linalg.vecdot(st, xBC[di + gn:].view(G, 1, 1, N)).view(H, P)
        y = torch.addcmul(y, p["D"], x).view(1, di) * F.silu(z)
        gs = p["gs"]
        y = y.view(di // gs, gs)
        y = (y * torch.linalg.vector_norm(y, dim=-1, keepdim=True).square_().mul_(1.0 / gs).add_(p["geps"])
             .rsqrt_()).view(1, di)                    # grouped RMSNorm (F.rms_norm: ~3x slower here)
        out = h if p["b_out"] is None else h + p["b_out"]
        return torch.addmm(out, y, p["W_out"])

    def _attn_step(self, h, s, p, cache, i, slot, pos):
        """Attention layer `i`: the new K/V stored at `pos` of `slot` as the cache stores them (`kv_store`: the
        storage dtype, FP8 quantized), all `pos + 1` read back as attention reads them (`kv_load`)."""
        W, Wo, nq, nkv, hd = p
        qkv = torch.mm(h, W).mul_(s)[0]
        k, v = cache.kv_store(i, qkv[nq * hd:(nq + nkv) * hd].view(nkv, hd), qkv[(nq + nkv) * hd:].view(nkv, hd))
        kb, vb = cache.k[i], cache.v[i]
        kb[slot, :, pos], vb[slot, :, pos] = k, v
        q = qkv[:nq * hd].view(1, nkv, nq // nkv, hd)
        keys, values = cache.kv_load(i, kb[slot:slot + 1, :, :pos + 1], vb[slot:slot + 1, :, :pos + 1])
        o = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype))
        return torch.addmm(h, o.view(1, nq * hd), Wo)

    def _moe_step(self, h, s, p):
        W1, b1, W2, b2, up, down, E, L, gate, nw = p
        f = self._lin_in(h, s, W1, b1)
        scores = torch.sigmoid(f[:, :E])
        if gate.n_group == 1:
            choice = scores + gate.e_score_correction_bias
            idx = choice.topk(gate.top_k, dim=-1).indices[0].tolist()
            sc = scores[0].tolist()
            w = [sc[e] for e in idx]
            if gate.norm_topk_prob:
                tot = sum(w) + 1e-20
                w = [v / tot for v in w]
            w = [v * gate.scale for v in w]
        else:
            wt, it = gate.select(scores)
            w, idx = wt[0].tolist(), it[0].tolist()
        lat = f[:, E:E + L] if L else torch.mul(h, nw).mul_(s)       # the experts' input
        acc = None
        for e, we in zip(idx, w):
            a = torch.mm(lat, up[e]).relu_().square_()
            acc = torch.mm(a, down[e]).mul_(we) if acc is None else torch.addmm(acc, a, down[e], alpha=we)
        sh = f[:, E + L:].relu_().square_()
        out = h if b2 is None else h + b2
        if not L:
            return torch.addmm(out + acc, sh, W2)
        return torch.addmm(out, torch.cat([acc, sh], 1), W2)

    # ------------------------------------------------------------------ the C kernel
    def _build_native(self, fn) -> None:
        """Describe every layer to decode_step.c (`Layer`: sizes, constants, fp32 copies of the small vectors
        and `Mat`s pointing at the model's own weight tensors, which the plan keeps referenced). Layers it
        cannot take leave `native` None."""
        blocks = self.model.backbone.layers
        nl = len(blocks)
        layers, shapes, self._keep = (_Layer * nl)(), [], []
        self._router_bias = []
        for L, blk in zip(layers, blocks):
            desc = self._native_layer(blk)
            if desc is None:
                return
            n, f, v, mats = desc
            if any(m is None for m in mats):
                return
            arr = (_Mat * len(mats))(*[m[0] for m in mats])
            self._keep += [arr] + [t for m in mats for t in m[1]]
            vs = [None if t is None else t.detach().float().contiguous() for t in v]
            self._keep += [t for t in vs if t is not None]
            L.kind = "M*E-".index(blk.kind)
            L.n[:len(n)], L.f[:len(f)] = n, f
            L.v[:len(vs)] = [None if t is None else t.data_ptr() for t in vs]
            L.m = arr
            m = blk.mixer
            if blk.kind == "M":
                shapes.append(((m.conv_dim, m.kernel - 1), (m.num_heads, m.head_dim, m.state_size)))
            else:
                shapes.append((m.n_kv, m.head_dim) if blk.kind == "*" else None)
        self._c = dict(layers=layers, eps=(ctypes.c_double * nl)(*[b.norm.eps for b in blocks]),
                       cap=(ctypes.c_int64 * nl)(), shapes=shapes)
        self._norm_f = self.norm_f.contiguous()
        self._eps_f = self.model.backbone.norm_f.eps
        emb = _dense_mat(self.emb) or _dense_mat(self.emb.float().contiguous())     # fp16 tables: an fp32 copy
        self._emb_mat, self._state_key, self._state_arr, self._head = emb[0], None, None, None
        self._keep += emb[1]
        self.native = fn

    def _native_layer(self, blk):
        """(n, f, v, mats) of decode_step.c's `Layer` for one block (see there); None = not supported."""
        c, m, nw = self.config, blk.mixer, blk.norm.weight
        if blk.kind == "M":
            w = m.conv1d.weight.detach().float()[:, 0].t()                                   # [K, C]
            if m.conv1d.bias is not None:
                w = torch.cat([w, m.conv1d.bias.detach().float()[None]], 0)                 # bias as a K+1th tap
            lo, hi = c.time_step_limit
            limit = lo > 0 or math.isfinite(hi)
            n = [m.d_inner, m.conv_dim, m.num_heads, m.head_dim, m.n_groups, m.state_size, m.kernel,
                 m.norm.group_size, int(m.conv1d.bias is not None), int(bool(c.mamba_dt_clamp)), int(limit)]
            f = [c.time_step_min if c.mamba_dt_clamp else 0.0, lo if limit else 0.0, hi if limit else 0.0, m.norm.eps]
            v = [nw, m.in_proj.bias, w, m.dt_bias, -torch.exp(m.A_log.detach().float()), m.D, m.norm.weight,
                 m.out_proj.bias]
            return n, f, v, [_mat(m.in_proj), _mat(m.out_proj)]
        if blk.kind == "*":
            if any(getattr(getattr(m, q), "bias", None) is not None for q in ("q_proj", "k_proj", "v_proj", "o_proj")):
                return None
            return [m.n_q, m.n_kv, m.head_dim], [], [nw], [_mat(getattr(m, q)) for q in
                                                            ("q_proj", "k_proj", "v_proj", "o_proj")]
        if blk.kind == "E":
            g, lat, se, ex = m.gate, m.fc1_latent_proj, m.shared_experts, m.experts
            E, L = g.n_experts, 0 if lat is None else lat.out_features
            bias = g.e_score_correction_bias
            grouped_ok = g.n_group == 1 or (E // g.n_group >= 2 and g.topk_group <= g.n_group)
            if E > 4096 or g.top_k > min(256, E) or not grouped_ok or bias.dtype != torch.float32 \
                    or not bias.is_contiguous():
                return None                                  # the kernel's fixed-size routing buffers
            self._router_bias.append((g, bias))
            I, lin = (ex.up_proj.shape[1], 2 * ex.up_proj.shape[2]) if isinstance(ex, NVFP4Experts) \
                else ex.up_proj.shape[1:]
            none = (_Mat(F32, 0, 0, None, None, 1.0), [])
            mats = [_mat(g), none if lat is None else _mat(lat), _mat(se.up_proj),
                    none if lat is None else _mat(m.fc2_latent_proj), _mat(se.down_proj)]
            mats += [_mat(ex, e, "up_proj") for e in range(E)] + [_mat(ex, e, "down_proj") for e in range(E)]
            n = [E, L, I, lin, se.up_proj.out_features, g.top_k, g.n_group, g.topk_group, int(g.norm_topk_prob)]
            v = [nw, bias, None if lat is None else lat.bias, se.up_proj.bias,
                 None if lat is None else m.fc2_latent_proj.bias, se.down_proj.bias]
            return n, [g.scale], v, mats
        return [m.up_proj.out_features], [], [nw, m.up_proj.bias, m.down_proj.bias], [_mat(m.up_proj),
                                                                                   _mat(m.down_proj)]

    def _state(self, cache, slots):
        """decode_step.c's `state` (each row's per-layer cache pointers) for these slots, or None when the cache
        is not laid out as the layers were described (the kernel indexes raw memory: the torch ops run then).
        Kept while the slots and the cache's buffers stay the same (a steady decode reuses it every step)."""
        bufs = [(cache.conv[i], cache.ssm[i]) if kind == "M" else (cache.k[i], cache.v[i]) if kind == "*" else None
                for kind, i in self.kinds]
        key = (cache, tuple(slots), tuple((a.data_ptr(), b.data_ptr(), a.dtype, a.shape[2]) for a, b in
                                          filter(None, bufs)), tuple(cache.kv_scales.values()))
        if self._state_key is not None and self._state_key[0] is cache and self._state_key[1:] == key[1:]:
            return self._state_arr
        c, B, nl = self._c, len(slots), len(self.kinds)
        state, cap = (ctypes.c_void_p * (2 * B * nl))(), c["cap"]
        for j, ((kind, i), ab) in enumerate(zip(self.kinds, bufs)):
            if ab is None:
                continue
            a, b = ab
            if kind == "M":
                ok = (a.shape[1:], b.shape[1:]) == c["shapes"][j] and a.dtype == torch.float32
            else:
                ok = (a.shape[1], a.shape[3]) == c["shapes"][j] and b.shape == a.shape and a.dtype in KV_BYTES
                if ok:                                   # the layer's K/V format: element bytes, E4M3 scales
                    L = c["layers"][j]
                    L.n[3] = KV_BYTES[a.dtype]
                    L.f[0], L.f[1] = cache.kv_scales[i] if a.dtype == FP8_KV else (1.0, 1.0)
                cap[j] = a.shape[2]
            if not (ok and cache.num_slots <= a.shape[0] and a.dtype == b.dtype
                    and a.is_contiguous() and b.is_contiguous()):
                return None
            pa, pb, sa, sb = a.data_ptr(), b.data_ptr(), a.stride(0) * a.element_size(), b.stride(0) * b.element_size()
            for r, slot in enumerate(slots):
                state[2 * (r * nl + j)] = pa + slot * sa
                state[2 * (r * nl + j) + 1] = pb + slot * sb
        self._state_key, self._state_arr = key, state
        return state

    def _rows_native(self, tokens, cache, slots, head=None):
        """The C kernel on B rows: (h [B, d], logits [B, V] or None); None (nothing done) when the cache is not
        laid out as the layers were described."""
        lengths = cache.lengths.numpy()                             # a view: numpy indexing is ~50x torch's
        pos = [int(lengths[s]) for s in slots]
        self._grow_kv(cache, max(pos) + 1)
        state = self._state(cache, slots)
        if state is None:
            return None
        B, d = len(slots), self.d
        hm = self._head_mat(head)
        out = torch.empty(B, d)
        logits = torch.empty(B, hm[0].rows) if hm is not None else None
        if self.native(self._c["layers"], len(self.kinds), d, B, ctypes.byref(self._emb_mat),
                       (ctypes.c_int64 * B)(*tokens), self._c["eps"], state, self._c["cap"],
                       (ctypes.c_int64 * B)(*pos), self._norm_f.data_ptr(), self._eps_f, out.data_ptr(),
                       None if hm is None else ctypes.byref(hm[0]), None if hm is None else logits.data_ptr(),
                       default_threads(self.threads)):
            raise MemoryError("the native decode step could not allocate its scratch memory")
        for slot, p in zip(slots, pos):
            lengths[slot] = p + 1
        return out, logits

    def _head_mat(self, head):
        """The `Mat` of `head` (None: no head, a bias, or a format the kernel does not read), kept while the head
        holds the same weight tensor."""
        if head is None or getattr(head, "bias", None) is not None:
            return None
        w = getattr(head, "weight", None)
        ptr = None if w is None else w.data_ptr()
        if self._head is None or self._head[0] is not head or self._head[1] is not w or self._head[2] != ptr:
            self._head = (head, w, ptr, _mat(head))
        return self._head[3]

"""NVFP4 training emulation (NVIDIA's NVFP4 pretraining recipe, arXiv 2509.25149; TE ``NVFP4BlockScaling``).

:class:`NVFP4TrainLinear` is a drop-in ``nn.Linear`` whose three GEMMs see NVFP4-fake-quantized inputs:

============  ===========================================  ==========  =========
GEMM          operands (blocks along the reduction dim)     rounding    RHT
============  ===========================================  ==========  =========
Fprop  y=xWᵀ  x: 1x16 along K; W: 16x16 tiles              RNE         no
Dgrad  dx=dyW dy: 1x16 along N (stochastic); W: same tiles  SR / RNE    no
Wgrad  dW=dyᵀx dyᵀ: 1x16 along tokens (SR); xᵀ: along tokens  SR / RNE  16-point
============  ===========================================  ==========  =========

Each quantization computes its own per-tensor amax from the live tensor every step ("current scaling"); for the
Wgrad operands the amax is taken after the random Hadamard transform. The 16x16 weight tiles make the rowwise
(Fprop) and columnwise (Dgrad) weight copies numerically identical. The RHT multiplies every 16 contiguous tokens
by ``M = diag(sign) @ H16 / 4`` (orthogonal), applied to both Wgrad operands so it cancels in the product. GEMMs
run in fp32 on the dequantized values; outputs are cast back to the input dtype. ``enabled = False`` (e.g. for the
last few layers, which the recipe keeps in BF16) makes the layer an ordinary ``nn.Linear``.

:func:`apply_nvfp4_training` applies the recipe to a whole model (``--precision nvfp4`` in the trainer): which
GEMMs go NVFP4 is :func:`nvfp4_training_plan` (Nemotron 3 Super's choice); parameters are kept, so checkpoints
stay ordinary high-precision checkpoints.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import nvfp4

# Transformer Engine's fixed wgrad sign vector (get_wgrad_sign_vector), one vector for the whole run.
TE_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def hadamard16(signs=TE_SIGNS, dtype=torch.float32, device=None) -> torch.Tensor:
    """``diag(signs) @ H16 / 4``: a 16x16 orthogonal matrix (entries +-1/4, exact in binary floating point)."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    s = torch.tensor(signs, dtype=dtype, device=device)
    return s.unsqueeze(1) * h / 4.0


def rht(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Apply ``m`` to every 16 contiguous elements of the last dim (which must be a multiple of 16)."""
    k = x.shape[-1]
    nvfp4._check_block_dim(k, what="RHT dimension")
    return (x.reshape(*x.shape[:-1], k // 16, 16) @ m).reshape(x.shape)


def _pad_last(x: torch.Tensor, mult: int = 16) -> torch.Tensor:
    pad = (-x.shape[-1]) % mult
    return F.pad(x, (0, pad)) if pad else x


def _fq2d(w: torch.Tensor) -> torch.Tensor:
    """16x16-tile NVFP4 fake quant of a 2-D weight; dims that are not multiples of 16 are zero-padded (zeros
    change no tile amax and quantize to 0), then cropped. A no-op padding for 16-aligned weights."""
    n, k = w.shape
    pn, pk = (-n) % 16, (-k) % 16
    if not (pn or pk):
        return nvfp4.fake_quantize_2d(w)
    return nvfp4.fake_quantize_2d(F.pad(w, (0, pk, 0, pn)))[:n, :k]


def _fq(x: torch.Tensor, stochastic: bool = False, generator=None) -> torch.Tensor:
    """1x16 NVFP4 fake quant along the last dim (zero-padded to a multiple of 16, then cropped)."""
    k = x.shape[-1]
    xp = _pad_last(x.float())
    return nvfp4.fake_quantize(xp, stochastic=stochastic, generator=generator)[..., :k]


class _NVFP4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stochastic, use_rht, generator):
        x2 = x.reshape(-1, x.shape[-1])
        wq = _fq2d(weight.detach().float())
        xq = _fq(x2)
        y = xq @ wq.t()
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x2, wq)
        ctx.has_bias, ctx.stochastic, ctx.use_rht, ctx.generator = bias is not None, stochastic, use_rht, generator
        ctx.x_shape, ctx.dtypes = x.shape, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, wq = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        sr, gen = ctx.stochastic, ctx.generator
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (_fq(dy2, sr, gen) @ wq).to(ctx.dtypes[0]).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dyt, xt = _pad_last(dy2.t()), _pad_last(x2.float().t())      # [N, T'], [K, T'] (zero tokens appended)
            if ctx.use_rht:
                m = hadamard16(device=dy2.device)
                dyt, xt = rht(dyt, m), rht(xt, m)
            dw = (nvfp4.fake_quantize(dyt, stochastic=sr, generator=gen) @ nvfp4.fake_quantize(xt).t())
            dw = dw.to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.dtypes[2])
        return dx, dw, db, None, None, None


def nvfp4_linear(x, weight, bias=None, *, stochastic=True, use_rht=True, generator=None):
    """Functional NVFP4-recipe linear (see module docstring)."""
    return _NVFP4LinearFn.apply(x, weight, bias, stochastic, use_rht, generator)


class NVFP4TrainLinear(nn.Linear):
    """``nn.Linear`` trained with the NVFP4 recipe; ``out_features`` must be a multiple of 16 (16x16 weight tiles)
    and ``in_features`` too (1x16 activation blocks), unless ``pad=True``: then the operands are zero-padded to
    multiples of 16 inside the GEMMs, as a kernel would. Set ``enabled = False`` to run it in high precision.
    ``generator=None`` draws the stochastic rounding from torch's global RNG (which trainer checkpoints save)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, stochastic=True,
                 use_rht=True, generator: torch.Generator | None = None, pad: bool = False):
        if not pad:
            nvfp4._check_block_dim(in_features, what="in_features")
            nvfp4._check_block_dim(out_features, what="out_features (16x16 weight tiles)")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.enabled, self.stochastic, self.use_rht, self.generator = True, stochastic, use_rht, generator

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "NVFP4TrainLinear":
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kw)
        with torch.no_grad():
            m.weight.copy_(linear.weight)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x):
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        return nvfp4_linear(x, self.weight, self.bias, stochastic=self.stochastic, use_rht=self.use_rht,
                            generator=self.generator)


# ---------------------------------------------------------------------------------------------- model recipe
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def nvfp4_training_plan(model: nn.Module, hp_last_fraction: float = 0.15) -> dict[str, str]:
    """Which GEMMs of a :class:`NemotronHForCausalLM` train in NVFP4, following the Nemotron 3 Super NVFP4
    pretraining run (reference: MTP layers, latent projections, QKV/attention projections, embeddings and the
    last 15% of layers kept in BF16; routers, norms, SSM scan and attention BMMs are not GEMMs of a linear).

    Returns ``{module or parameter name: "nvfp4" | reason it stays high precision}`` for every ``nn.Linear``
    plus every routed-expert block (``...mixer.experts``). The last ``ceil(hp_last_fraction * L)`` backbone
    layers (by pattern index) stay high precision."""
    from ..model.moe import Experts
    cfg = model.config
    n_layers = len(cfg.pattern)
    first_hp = n_layers - math.ceil(hp_last_fraction * n_layers - 1e-9)
    plan = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, Experts)):
            continue
        parts = name.split(".")
        if parts[:2] != ["backbone", "layers"]:
            plan[name] = "mtp" if parts[0] == "mtp" else name          # lm_head, MTP block
        elif int(parts[2]) >= first_hp:
            plan[name] = f"last {n_layers - first_hp} of {n_layers} layers"
        elif cfg.pattern[int(parts[2])] == "*" or parts[-1] in ATTENTION_PROJ:
            plan[name] = "attention"
        elif parts[-1].endswith("latent_proj"):
            plan[name] = "latent projection"
        else:
            plan[name] = "nvfp4"
    return plan


def apply_nvfp4_training(model: nn.Module, hp_last_fraction: float = 0.15, *, stochastic: bool = True,
                         use_rht: bool = True, generator: torch.Generator | None = None) -> dict[str, str]:
    """Switch ``model`` in place to NVFP4 training per :func:`nvfp4_training_plan` and return the plan.

    Linears become :class:`NVFP4TrainLinear` (``pad=True``) holding the *same* Parameter objects, so parameter
    names, optimizer state, checkpoints and export are unchanged (checkpoints stay ordinary fp32; the fp32
    weights are the master copy and are re-quantized every step). Routed experts get ``linear_fn`` =
    :func:`nvfp4_linear` (16x16 tiles per expert matrix, SR + RHT in backward). Call before building the
    optimizer or wrapping in DDP."""
    from ..model.moe import Experts
    plan = nvfp4_training_plan(model, hp_last_fraction)
    kw = dict(stochastic=stochastic, use_rht=use_rht, generator=generator)
    new = {}
    for name, mod in model.named_modules():
        if plan.get(name) != "nvfp4":
            continue
        if isinstance(mod, Experts):
            mod.linear_fn = partial(nvfp4_linear, **kw)
        elif type(mod) is nn.Linear:
            q = NVFP4TrainLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta",
                                 pad=True, **kw)
            q.weight, q.bias = mod.weight, mod.bias
            q.train(mod.training)
            new[id(mod)] = q
    # replace every reference (a module may be registered under more than one parent)
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if id(child) in new:
                setattr(parent, child_name, new[id(child)])
    return plan

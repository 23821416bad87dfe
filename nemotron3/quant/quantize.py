"""Whole-model post-training quantization: packed routed experts, module swapping, max calibration.

* :class:`NVFP4Experts` replaces ``model.moe.Experts`` (same ``forward(x, idx, w)`` contract). Per projection
  it holds ``up_proj`` uint8 [E, I, l/2], ``up_proj_weight_scale`` float8_e4m3fn [E, I, l/16],
  ``up_proj_weight_scale_2`` fp32 [E] (one global scale per expert: each expert is its own tensor on disk) and
  optionally ``up_proj_input_scale`` fp32 [E]; ``down_proj*`` likewise with [E, l, I/2]. ``checkpoint.py`` maps
  these to ModelOpt's per-expert names ``experts.{e}.up_proj.{weight,weight_scale,weight_scale_2,input_scale}``.
  Only experts that receive tokens are dequantized, one at a time (bounded temporary memory: one expert).
* :func:`quantize_model` swaps modules in place following a recipe (``quant.recipe``): nn.Linear ->
  NVFP4Linear / FP8Linear, Experts -> NVFP4Experts. With calibration batches it first runs the BF16 model and
  records each quantized module's input amax (ModelOpt "max" calibration): ``input_scale = amax / (6*448)`` for
  NVFP4 inputs and ``amax / 448`` for FP8 (reference §1.2 / §2.2). Fused groups (attention q/k/v) that are
  quantized share ``weight_scale_2`` (NVFP4) or ``weight_scale`` (FP8) = the group's max, as ModelOpt's export
  (``preprocess_linear_fusion``) and TRT-LLM's assertion require, and their (identical-input) ``input_scale``.
  ``kv_cache_dtype="fp8"`` also declares an FP8 KV cache: every attention layer (MTP included) gets
  ``k_scale`` / ``v_scale`` = the calibrated amax of its k_proj / v_proj output / 448 (ModelOpt's unified HF
  export: ``postprocess_state_dict`` divides the ``k_bmm_quantizer`` amax by 448 and does not clamp), 1.0
  without calibration. Calibration runs the MTP block too (``forward_mtp``), so its layers are calibrated alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import nvfp4
from .linear import FP8Linear, KeepQuantDtypes, NVFP4Linear
from .recipe import get_recipe
from ..model.attention import Attention
from ..model.cache import KV_CACHE_DTYPES
from ..model.moe import Experts, dispatch_experts, relu2

QUANT_MODULES = (NVFP4Linear, FP8Linear)
_FUSED = (("q_proj", "k_proj", "v_proj"),)


class NVFP4Experts(KeepQuantDtypes):
    """W4A16 routed experts; see the module docstring for buffers and layout."""
    QUANT_BUFFERS = tuple(f"{p}{s}" for p in ("up_proj", "down_proj")
                          for s in ("", "_weight_scale", "_weight_scale_2", "_input_scale"))

    def __init__(self, n_experts: int, intermediate: int, width: int, device=None):
        super().__init__()
        nvfp4._check_block_dim(width, what="moe_input_size (up_proj K)")
        nvfp4._check_block_dim(intermediate, what="moe_intermediate_size (down_proj K)")
        self.n_experts = n_experts
        for p, (n, k) in (("up_proj", (intermediate, width)), ("down_proj", (width, intermediate))):
            self.register_buffer(p, torch.zeros(n_experts, n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{p}_weight_scale",
                                 torch.ones(n_experts, n, k // nvfp4.BLOCK, device=device).to(nvfp4.FP8_DTYPE))
            self.register_buffer(f"{p}_weight_scale_2", torch.zeros(n_experts, dtype=torch.float32, device=device))
            self.register_buffer(f"{p}_input_scale", None)

    @classmethod
    def from_experts(cls, experts: Experts) -> "NVFP4Experts":
        up, down = experts.up_proj.detach(), experts.down_proj.detach()
        E, I, l = up.shape
        m = cls(E, I, l, device=up.device)
        for p, w in (("up_proj", up), ("down_proj", down)):
            for e in range(E):
                packed, bs, s2 = nvfp4.quantize(w[e])
                getattr(m, p)[e].copy_(packed)
                getattr(m, f"{p}_weight_scale")[e].copy_(bs)
                getattr(m, f"{p}_weight_scale_2")[e].copy_(s2)
        return m

    def dequantized(self, proj: str, e: int, dtype=torch.float32) -> torch.Tensor:
        return nvfp4.dequantize(getattr(self, proj)[e], getattr(self, f"{proj}_weight_scale")[e],
                                getattr(self, f"{proj}_weight_scale_2")[e], dtype=dtype)

    def bits_per_element(self) -> float:
        nbytes = sum(b.numel() * b.element_size() for n, b in self.named_buffers() if not n.endswith("input_scale"))
        return 8.0 * nbytes / (2 * self.up_proj.numel() * 2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """As ``Experts.forward``: x [N, l], idx/w [N, k] -> [N, l], with weights dequantized per used expert."""
        def expert(e, h):
            h = relu2(F.linear(h, self.dequantized("up_proj", e, x.dtype)))
            return F.linear(h, self.dequantized("down_proj", e, x.dtype))
        return dispatch_experts(x, idx, w, self.n_experts, expert)


def module_formats(model: nn.Module, recipe) -> dict[str, str]:
    """{module name: format} for every nn.Linear and Experts module of ``model`` under ``recipe``."""
    fn = get_recipe(recipe)
    return {n: fn(model.config, n) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Experts))}


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


@torch.no_grad()
def _calibrate(model, formats: dict[str, str], batches, kv: bool = False) -> dict[str, torch.Tensor]:
    """Max calibration: input amax of each quantized module (per expert [E] for routed experts); with ``kv``
    also the K and V amax of each attention layer (``{attention}.k_scale`` / ``.v_scale`` keys)."""
    amax: dict[str, torch.Tensor] = {}

    def keep(name, v):
        amax[name] = v if name not in amax else torch.maximum(amax[name], v)

    def linear_hook(name):
        return lambda mod, args, out: keep(name, args[0].detach().abs().amax().float())

    def experts_hook(name):
        def hook(mod, args, out):
            x, idx, _ = args
            up, down = torch.zeros(mod.n_experts), torch.zeros(mod.n_experts)
            for e in idx.unique().tolist():
                xe = x[(idx == e).any(-1)]
                up[e] = xe.abs().amax().float()
                down[e] = relu2(F.linear(xe, mod.up_proj[e])).abs().amax().float()
            keep(name + ".up_proj", up)
            keep(name + ".down_proj", down)
        return hook

    def output_hook(name):
        return lambda mod, args, out: keep(name, out.detach().abs().amax().float())

    handles = [m.register_forward_hook(experts_hook(n) if isinstance(m, Experts) else linear_hook(n))
               for n, m in model.named_modules() if formats.get(n, "bf16") != "bf16"]
    if kv:
        for n, m in model.named_modules():
            if isinstance(m, Attention):
                handles += [m.k_proj.register_forward_hook(output_hook(f"{n}.k_scale")),
                            m.v_proj.register_forward_hook(output_hook(f"{n}.v_scale"))]
    try:
        for b in batches:
            b = b.to(model.device)
            model.forward_mtp(b, 1) if model.mtp is not None else model(b)
    finally:
        for h in handles:
            h.remove()
    return amax


def _input_scale(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    return (amax.float() / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX if fmt == "nvfp4" else nvfp4.E4M3_MAX)).clone()


@torch.no_grad()
def quantize_model(model: nn.Module, recipe, calib_batches=None, kv_cache_dtype: str = "auto") -> nn.Module:
    """Swap the model's linears / routed experts for quantized modules in place, following ``recipe`` (a built-in
    name, a recipe file or a callable (config, module name) -> format; ``quant.recipe``). ``calib_batches``: an
    iterable of [B, T] token-id tensors run through the BF16 model first to set ``input_scale`` (and the K/V
    scales). ``kv_cache_dtype`` "fp8" declares an FP8 KV cache; "auto" / "bfloat16" leave it unquantized.
    Returns ``model``."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}")
    kv = kv_cache_dtype == "fp8"
    formats = module_formats(model, recipe)
    amax = _calibrate(model, formats, calib_batches, kv) if calib_batches is not None else {}
    shared: dict[str, torch.Tensor] = {}          # fused group members -> shared weight global scale
    for name, fmt in formats.items():
        parent, _, leaf = name.rpartition(".")
        for group in _FUSED:
            members = [f"{parent}.{g}" for g in group]
            if leaf in group and all(formats.get(m) == fmt != "bf16" for m in members):
                ws = [model.get_submodule(m).weight.detach().abs().amax().float() for m in members]
                scale = torch.stack(ws).max() / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX if fmt == "nvfp4" else nvfp4.E4M3_MAX)
                shared[name] = scale
                ins = [amax[m] for m in members if m in amax]
                if ins:
                    amax[name] = torch.stack(ins).max()
    for name, fmt in formats.items():
        mod = model.get_submodule(name)
        if fmt == "bf16":
            continue
        if fmt not in ("nvfp4", "fp8"):
            raise ValueError(f"recipe gave unknown format {fmt!r} for {name}")
        if isinstance(mod, Experts):
            if fmt != "nvfp4":
                raise ValueError(f"{name}: routed experts support only nvfp4, recipe asked for {fmt}")
            new = NVFP4Experts.from_experts(mod)
            for p in ("up_proj", "down_proj"):
                if f"{name}.{p}" in amax:
                    a = amax[f"{name}.{p}"].to(new.up_proj.device)
                    a = torch.where(a > 0, a, a.max())     # experts that saw no calibration token: layer max
                    setattr(new, f"{p}_input_scale", _input_scale(a, fmt))
        else:
            cls = NVFP4Linear if fmt == "nvfp4" else FP8Linear
            new = cls.from_linear(mod, shared.get(name))
            if name in amax:
                new.input_scale = _input_scale(amax[name], fmt).reshape(()).to(new.weight.device)
        _set(model, name, new)
    if kv:
        for name, m in model.named_modules():
            if isinstance(m, Attention):
                m.k_scale, m.v_scale = (_kv_scale(amax.get(f"{name}.{s}")) for s in ("k_scale", "v_scale"))
    return model


def _kv_scale(amax: torch.Tensor | None) -> float:
    """ModelOpt's FP8 KV scale: amax / 448 (1.0 uncalibrated, or for a layer whose K/V were all zero)."""
    return float(amax) / nvfp4.E4M3_MAX if amax is not None and float(amax) > 0 else 1.0


def quantized_module_formats(model: nn.Module) -> dict[str, str]:
    """{name: "nvfp4" | "fp8"} of the quantized modules actually present in ``model``."""
    return {n: "fp8" if isinstance(m, FP8Linear) else "nvfp4" for n, m in model.named_modules()
            if isinstance(m, (NVFP4Linear, FP8Linear, NVFP4Experts))}


def quant_state_names(model: nn.Module) -> set[str]:
    """State-dict names of quantized tensors (codes, FP8 weights, scales): never cast to the model dtype."""
    out = set()
    for n, m in model.named_modules():
        if isinstance(m, (NVFP4Linear, FP8Linear, NVFP4Experts)):
            out.update(f"{n}.{b}" for b in m.QUANT_BUFFERS)
    return out


def apply_layout(model: nn.Module, formats: dict[str, str], input_scales: set[str] = frozenset()) -> nn.Module:
    """Replace modules by empty quantized ones (on the modules' device, e.g. meta) so a quantized state dict
    fits: ``formats`` {module name: "nvfp4" | "fp8"}; ``input_scales``: module names that get an input_scale."""
    for name, fmt in formats.items():
        mod = model.get_submodule(name)
        dev = next(mod.parameters()).device
        if isinstance(mod, Experts):
            if fmt != "nvfp4":
                raise ValueError(f"{name}: routed experts stored as {fmt}; only NVFP4 experts are supported")
            E, I, l = mod.up_proj.shape
            new = NVFP4Experts(E, I, l, device=dev)
            if name in input_scales:
                for p in ("up_proj", "down_proj"):
                    setattr(new, f"{p}_input_scale", torch.zeros(E, device=dev))
        else:
            cls = NVFP4Linear if fmt == "nvfp4" else FP8Linear
            new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, device=dev)
            if name in input_scales:
                new.input_scale = torch.zeros((), device=dev)
        _set(model, name, new)
    return model


def calibration_batches(documents, tokenizer, n: int, seq_len: int = 512, batch_size: int = 1) -> list[torch.Tensor]:
    """``n`` batches [batch_size, seq_len] of real text: ``documents`` (strings, e.g. a corpus train split)
    tokenized and joined with EOS, cut into consecutive rows. Fewer rows if the text runs out."""
    need, buf = n * batch_size * seq_len, []
    for text in documents:
        buf.extend(tokenizer.encode(text) + [tokenizer.eos_id])
        if len(buf) >= need:
            break
    rows = len(buf) // seq_len
    if rows == 0:
        raise ValueError(f"calibration text too short: {len(buf)} tokens < seq_len {seq_len}")
    ids = torch.tensor(buf[:rows * seq_len], dtype=torch.long).view(rows, seq_len)
    return [ids[i:i + batch_size] for i in range(0, min(rows, n * batch_size), batch_size)]

"""Weight-only quantized linear layers (W4A16 NVFP4 and W8A16 FP8 per-tensor) for inference.

Weights stay quantized in memory under Model-Optimizer checkpoint names:

* :class:`NVFP4Linear`: ``weight`` uint8 [N, K/2] (packed E2M1, element 0 in the low nibble), ``weight_scale``
  float8_e4m3fn [N, K/16], ``weight_scale_2`` fp32 scalar -> 4.5 bits per weight element (+ 32 bits per tensor).
* :class:`FP8Linear`: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` fp32 scalar (amax/448).
* both: optional ``input_scale`` fp32 scalar (calibrated activation scale; unused by the W4A16 / W8A16 compute).

``forward`` dequantizes ``chunk_rows`` output rows at a time straight into the activation dtype and multiplies,
so the temporary high-precision weight is at most ``chunk_rows x K`` elements (plus one fp32 chunk while
decoding). The result equals ``F.linear(x, dequantized_weight.to(x.dtype), bias)`` up to matmul blocking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import nvfp4

DEFAULT_CHUNK_ROWS = 1024
BF16_CHUNK_ELEMENTS = 1 << 22         # BF16Linear's default: fp32 rows widened at a time, in elements


def _quant_bits_per_element(module: nn.Module, numel: int) -> float:
    names = ("weight", "weight_scale", "weight_scale_2")
    nbytes = sum(getattr(module, n).numel() * getattr(module, n).element_size() for n in names if hasattr(module, n))
    return 8.0 * nbytes / numel


class KeepQuantDtypes(nn.Module):
    """``module.to(dtype)`` / ``.half()`` must not cast packed codes, FP8 weights or fp32 scales: ``_apply`` moves
    the buffers named in ``QUANT_BUFFERS`` to the new device only, and converts everything else as usual."""
    QUANT_BUFFERS: tuple = ()

    def _apply(self, fn, recurse=True):
        held = {k: self._buffers.pop(k) for k in self.QUANT_BUFFERS if self._buffers.get(k) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            dev = fn(torch.empty(0)).device
            self._buffers.update({k: v.to(dev) for k, v in held.items()})
        return self


class _QuantLinearBase(KeepQuantDtypes):
    QUANT_BUFFERS = ("weight", "weight_scale", "weight_scale_2", "input_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 chunk_rows: int, device=None):
        super().__init__()
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        self.in_features, self.out_features, self.chunk_rows = in_features, out_features, chunk_rows
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # ModelOpt ``input_scale`` (fp32 scalar: act amax / (6*448) for NVFP4, / 448 for FP8), set by calibration
        # (``quant.quantize_model``) or a checkpoint; None = uncalibrated (W4A16-only checkpoint, not written)
        self.register_buffer("input_scale", None)

    @classmethod
    def _shaped_like(cls, linear: nn.Linear, chunk_rows: int, **tensors: torch.Tensor):
        """A module of `linear`'s shape, dtype, device and bias holding the given quantized tensors."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=w.dtype,
                chunk_rows=chunk_rows, device=w.device)
        for name, t in tensors.items():
            getattr(m, name).copy_(t)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequant_rows(0, self.out_features, dtype)

    def bits_per_element(self) -> float:
        """Bytes held by the quantized weight tensors (weight + scales), in bits per weight element."""
        return _quant_bits_per_element(self, self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {x.shape[-1]}")
        n, step = self.out_features, self.chunk_rows
        if n <= step:
            out = F.linear(x, self._dequant_rows(0, n, x.dtype))
        else:
            out = x.new_empty(*x.shape[:-1], n)
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                out[..., r0:r1] = F.linear(x, self._dequant_rows(r0, r1, x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, chunk_rows={self.chunk_rows}")


class NVFP4Linear(_QuantLinearBase):
    """W4A16 NVFP4 linear (1x16 blocks along ``in_features``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, device=None):
        nvfp4._check_block_dim(in_features, what="in_features")
        super().__init__(in_features, out_features, bias, dtype, chunk_rows, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // nvfp4.BLOCK,
                                                        device=device).to(nvfp4.FP8_DTYPE))
        self.register_buffer("weight_scale_2", torch.zeros((), dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, global_scale: torch.Tensor | float | None = None,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> "NVFP4Linear":
        """Quantize an ``nn.Linear`` (``global_scale`` overrides ``weight_scale_2``, e.g. shared by a fused group)."""
        packed, bs, s2 = nvfp4.quantize(linear.weight.detach(), global_scale)
        return cls._shaped_like(linear, chunk_rows, weight=packed, weight_scale=bs, weight_scale_2=s2)

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return nvfp4.dequantize(self.weight[r0:r1], self.weight_scale[r0:r1], self.weight_scale_2, dtype=dtype)


class FP8Linear(_QuantLinearBase):
    """W8A16 FP8 E4M3 per-tensor linear (``weight_scale = amax/448``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, device=None):
        super().__init__(in_features, out_features, bias, dtype, chunk_rows, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device).to(nvfp4.FP8_DTYPE))
        self.register_buffer("weight_scale", torch.zeros((), dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale: torch.Tensor | float | None = None,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> "FP8Linear":
        w8, s = nvfp4.quantize_fp8(linear.weight.detach(), scale)
        return cls._shaped_like(linear, chunk_rows, weight=w8, weight_scale=s)

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return nvfp4.dequantize_fp8(self.weight[r0:r1], self.weight_scale, dtype=dtype)


class BF16Linear(_QuantLinearBase):
    """W16A32: a bf16 weight kept as stored (half the bytes of fp32), multiplied with fp32 activations. The CPU
    decode kernel reads it in place (widening loads); ``forward`` (prefill) widens ``chunk_rows`` rows at a time
    and runs the fp32 GEMM, which on CPUs without AVX512_BF16 / AMX is ~5x faster than torch's bf16 GEMM
    (bench/cpu_gemm.py). The default ``chunk_rows`` bounds the transient fp32 rows by elements
    (``BF16_CHUNK_ELEMENTS``, 16 MiB) rather than rows: a small model's linears then run as one GEMM each, with no
    split output to copy back (pico's 1288-row in_proj took two GEMMs and a copy at 1024 rows)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 chunk_rows: int | None = None, device=None):
        chunk_rows = max(1, BF16_CHUNK_ELEMENTS // in_features) if chunk_rows is None else chunk_rows
        super().__init__(in_features, out_features, bias, dtype, chunk_rows, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, chunk_rows: int | None = None) -> "BF16Linear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                dtype=linear.bias.dtype if linear.bias is not None else torch.float32, chunk_rows=chunk_rows,
                device=w.device)
        m.weight.copy_(w)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[r0:r1].to(dtype)


def store_bf16(model: nn.Module) -> nn.Module:
    """Keep the model's linear and routed-expert weights in bf16 (W16A32: activations stay in the model's dtype),
    in place: every nn.Linear except ``lm_head`` becomes a BF16Linear, routed experts' fp32 weights become bf16
    (their forward widens each used expert). The values are the bf16-rounded weights (exact for a bf16
    checkpoint). Returns the model."""
    from ..model.moe import Experts
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if type(child) is nn.Linear and full != "lm_head":
                setattr(mod, cname, BF16Linear.from_linear(child))
            elif type(child) is Experts and child.linear_fn is None:
                for p in ("up_proj", "down_proj"):
                    setattr(child, p, nn.Parameter(getattr(child, p).detach().bfloat16(), requires_grad=False))
    return model

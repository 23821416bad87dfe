"""NVFP4 (E2M1 elements, 16-element E4M3 block scales, FP32 per-tensor scale) and FP8 E4M3 per-tensor.

Formulas and byte layouts follow NVIDIA Model Optimizer (ModelOpt) ``NVFP4QTensor`` as exported in Hugging Face
checkpoints (see ``shared/reference/nvfp4.md`` sections 1-2):

* per-tensor (decode) scale ``s2 = amax(|W|) / (6 * 448)``            -> checkpoint ``weight_scale_2`` (fp32 scalar)
* per 16-block scale ``s_b = e4m3_rne(amax_b / (6 * s2))``             -> checkpoint ``weight_scale`` (float8_e4m3fn)
  (ModelOpt's fp32 op order, ``6 * s2`` first: ``(amax_b / 6) / s2`` differs by an fp32 ulp and so by one E4M3
  step for blocks next to an E4M3 rounding tie. A block whose ratio is 0 gets ``s_b = 1.0``. Deviation: we
  clamp the ratio to [2^-9, 448] before the cast; ModelOpt does not clamp, so for a nonzero block with
  ``amax_b / (6 * s2) <= 2^-10`` (a block ~10^6 times below the tensor amax) it stores scale 0 and codes
  from x/0 (dequantizing to 0) where we store 2^-9 and real codes; with a computed or max-shared ``s2`` the
  ratio never exceeds 448, so every other block is byte-identical: ``tests/test_nvfp4.py::
  test_modelopt_fixture_*`` checks that against bytes produced by ModelOpt's own ``NVFP4QTensor``.)
* element code ``q = e2m1_rne(x / (fp32(s_b) * s2))`` (round to nearest, ties to even, saturating at +-6)
* packed ``uint8 [..., K/2]`` with element ``2i`` in the LOW nibble and ``2i+1`` in the high nibble
* dequantize ``x_hat = e2m1(q) * (fp32(s_b) * s2)``

An all-zero tensor gets ``s2 = 0`` (the honest ``amax/2688``); codes are 0 and dequantization gives exact zeros
(ModelOpt computes 0/0 there and stores NaN block scales).
NaN/Inf inputs and a last dimension that is not a multiple of 16 raise ``ValueError``.
"""
from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0 ** -9
FP8_DTYPE = torch.float8_e4m3fn

# code -> value; codes 8..15 are the negatives of 0..7 (code 8 = -0)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# RNE decision boundaries on |v|: index = #bounds strictly below |v|, +1 on the ties that round up to an even code
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)


def _lut(device=None) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------- validation
def _check_finite(x: torch.Tensor, what: str = "input") -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"NVFP4/FP8 quantization: {what} contains NaN or Inf values")


def _check_block_dim(k: int, block: int = BLOCK, what: str = "last dimension (K / in_features)") -> None:
    if k % block != 0:
        raise ValueError(f"NVFP4 quantization needs the {what} to be a multiple of {block}, got {k}; "
                         f"pad the tensor to a multiple of {block} first")


# ---------------------------------------------------------------------------------------------- E2M1
def e2m1_encode(v: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes (uint8 in 0..15).

    Deterministic mode: round-to-nearest, ties to even, saturating at +-6. Stochastic mode: after clamping to
    [-6, 6], round to the lower or upper neighbouring grid value with P(upper) = (|v| - lo) / (hi - lo), which
    makes ``E[decode(code)] == clamp(v, -6, 6)``. The sign bit is set for v < 0 only (as ModelOpt / TE)."""
    v = v.float().contiguous()
    a = v.abs()
    if stochastic:
        grid = torch.tensor(_GRID, dtype=torch.float32, device=v.device)
        a = a.clamp(max=E2M1_MAX)
        lo_idx = torch.bucketize(a, grid, right=True) - 1            # largest grid value <= a
        hi_idx = (lo_idx + 1).clamp(max=len(_GRID) - 1)
        lo, hi = grid[lo_idx], grid[hi_idx]
        gap = hi - lo
        p = torch.where(gap > 0, (a - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(a))
        r = torch.rand(a.shape, generator=generator, device=v.device, dtype=torch.float32)
        idx = torch.where(r < p, hi_idx, lo_idx)
    else:
        bounds = torch.tensor(_BOUNDS, dtype=torch.float32, device=v.device)
        idx = torch.bucketize(a, bounds, right=False)                # number of bounds strictly below a
        ties = (a == _TIES_UP[0]) | (a == _TIES_UP[1]) | (a == _TIES_UP[2])
        idx = idx + ties.to(idx.dtype)
    code = idx.to(torch.uint8)
    return code | ((v < 0).to(torch.uint8) << 3)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) -> fp32 values."""
    return _lut(code.device)[code.long()]


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (K even) -> packed uint8 [..., K/2]; element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack needs an even last dimension, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [..., K/2] -> codes uint8 [..., K] (low nibble first)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NVFP4 data must be uint8, got {packed.dtype}")
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ---------------------------------------------------------------------------------------------- scales
def global_scale(x: torch.Tensor) -> torch.Tensor:
    """``s2 = amax(|x|) / (6 * 448)`` as an fp32 scalar (``weight_scale_2``)."""
    return (x.detach().abs().amax().float() / (E2M1_MAX * E4M3_MAX)).reshape(())


def _block_scale_from_amax(amax_b: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """ModelOpt ``get_weights_scaling_factor``: ``e4m3(amax_b / (6 * s2))`` (this fp32 op order), a zero ratio
    -> 1.0; plus our clamp to [2^-9, 448] (see the module docstring)."""
    safe_s2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
    q = amax_b.float() / (E2M1_MAX * safe_s2)
    q = torch.where(q == 0, torch.ones_like(q), q)
    q = q.clamp(min=E4M3_MIN_SUBNORMAL, max=E4M3_MAX)
    return q.to(FP8_DTYPE)


def _encode_blocks(xb: torch.Tensor, scale_fp32: torch.Tensor, s2: torch.Tensor, stochastic: bool,
                   generator: torch.Generator | None) -> torch.Tensor:
    """xb [..., nb, 16] with matching scale [..., nb] -> codes [..., nb, 16]."""
    denom = (scale_fp32 * s2).unsqueeze(-1)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))    # zero tensor: s2 == 0, x == 0
    return e2m1_encode(xb.float() / denom, stochastic=stochastic, generator=generator)


# ---------------------------------------------------------------------------------------------- 1x16 (ModelOpt)
def quantize(w: torch.Tensor, global_scale_: torch.Tensor | float | None = None, *, stochastic: bool = False,
             generator: torch.Generator | None = None):
    """NVFP4-quantize ``w [..., K]`` in 1x16 blocks along the last dim.

    Returns ``(packed uint8 [..., K/2], block_scale float8_e4m3fn [..., K/16], global_scale fp32 scalar)``.
    ``global_scale_`` overrides ``s2`` (e.g. a fused q/k/v or gate/up group sharing one ``weight_scale_2``)."""
    if w.dim() < 1:
        raise ValueError("quantize needs at least a 1-D tensor")
    _check_block_dim(w.shape[-1])
    _check_finite(w)
    s2 = global_scale(w) if global_scale_ is None else torch.as_tensor(global_scale_, dtype=torch.float32).reshape(())
    s2 = s2.to(w.device)
    xb = w.detach().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax_b = xb.abs().amax(dim=-1)
    block_scale = _block_scale_from_amax(amax_b, s2)
    codes = _encode_blocks(xb, block_scale.float(), s2, stochastic, generator)
    return pack(codes.reshape(w.shape)), block_scale, s2


def encode_with_scales(w: torch.Tensor, block_scale: torch.Tensor, global_scale_: torch.Tensor, *,
                       stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantize ``w`` with given (stored) scales; returns the packed uint8 tensor."""
    _check_block_dim(w.shape[-1])
    _check_finite(w)
    xb = w.detach().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    s2 = torch.as_tensor(global_scale_, dtype=torch.float32, device=w.device).reshape(())
    codes = _encode_blocks(xb, block_scale.float(), s2, stochastic, generator)
    return pack(codes.reshape(w.shape))


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale_: torch.Tensor | float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_hat = e2m1(code) * (fp32(block_scale) * global_scale)`` -> ``[..., K]`` in ``dtype``.

    ``block_scale`` may be [..., K/16] (1x16 layout) or, for 2-D tiles, already expanded to that layout."""
    vals = e2m1_decode(unpack(packed))
    k = vals.shape[-1]
    if block_scale.shape[-1] * BLOCK != k:
        raise ValueError(f"block_scale last dim {block_scale.shape[-1]} does not match K={k} / {BLOCK}")
    s2 = torch.as_tensor(global_scale_, dtype=torch.float32, device=vals.device)
    s = block_scale.float() * s2
    out = vals.reshape(*vals.shape[:-1], k // BLOCK, BLOCK) * s.unsqueeze(-1)
    return out.reshape(vals.shape).to(dtype)


def fake_quantize(w: torch.Tensor, *, stochastic: bool = False, generator: torch.Generator | None = None,
                  global_scale_: torch.Tensor | float | None = None) -> torch.Tensor:
    """Quantize-then-dequantize in 1x16 blocks (same shape and dtype as ``w``); no gradient (wrap in an STE)."""
    with torch.no_grad():
        p, bs, s2 = quantize(w, global_scale_, stochastic=stochastic, generator=generator)
        return dequantize(p, bs, s2, dtype=w.dtype)


# ---------------------------------------------------------------------------------------------- 16x16 (training)
def quantize_2d(w: torch.Tensor, *, global_scale_: torch.Tensor | float | None = None):
    """NVFP4 with one E4M3 scale per 16x16 tile of a 2-D ``w [N, K]`` (the pretraining recipe's weight mode).

    Returns ``(packed uint8 [N, K/2], tile_scale float8_e4m3fn [N/16, K/16], global_scale fp32 scalar)``.
    Use :func:`expand_tile_scales` to get the ModelOpt/1x16 layout [N, K/16] (then :func:`dequantize` applies)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_2d needs a 2-D tensor, got shape {tuple(w.shape)}")
    n, k = w.shape
    _check_block_dim(k)
    _check_block_dim(n, what="first dimension (N / out_features) for 16x16 tiles")
    _check_finite(w)
    s2 = global_scale(w) if global_scale_ is None else torch.as_tensor(global_scale_, dtype=torch.float32).reshape(())
    s2 = s2.to(w.device)
    tiles = w.detach().reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    amax_t = tiles.abs().amax(dim=(1, 3))                              # [N/16, K/16]
    tile_scale = _block_scale_from_amax(amax_t, s2)
    row_scale = expand_tile_scales(tile_scale)                         # [N, K/16]
    xb = w.detach().reshape(n, k // BLOCK, BLOCK)
    codes = _encode_blocks(xb, row_scale.float(), s2, False, None)
    return pack(codes.reshape(n, k)), tile_scale, s2


def expand_tile_scales(tile_scale: torch.Tensor) -> torch.Tensor:
    """[N/16, K/16] tile scales -> [N, K/16] (each tile scale replicated to its 16 rows)."""
    return tile_scale.repeat_interleave(BLOCK, dim=0)


def dequantize_2d(packed: torch.Tensor, tile_scale: torch.Tensor, global_scale_, dtype=torch.float32) -> torch.Tensor:
    return dequantize(packed, expand_tile_scales(tile_scale), global_scale_, dtype=dtype)


def fake_quantize_2d(w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        p, ts, s2 = quantize_2d(w)
        return dequantize_2d(p, ts, s2, dtype=w.dtype)


# ---------------------------------------------------------------------------------------------- FP8 per-tensor
def quantize_fp8(w: torch.Tensor, scale: torch.Tensor | float | None = None):
    """FP8 E4M3 per-tensor: ``scale = amax / 448`` (fp32 scalar), ``w8 = e4m3(w / scale)`` (RNE, clamped to 448).

    Returns ``(w8 float8_e4m3fn, scale fp32 scalar)``; all-zero input gives scale 0 and zero codes."""
    _check_finite(w)
    if scale is None:
        scale = (w.detach().abs().amax().float() / E4M3_MAX).reshape(())
    scale = torch.as_tensor(scale, dtype=torch.float32, device=w.device).reshape(())
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    w8 = (w.detach().float() / safe).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return w8, scale


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32, device=w8.device)
    return (w8.float() * s).to(dtype)


def fake_quantize_fp8(w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        w8, s = quantize_fp8(w)
        return dequantize_fp8(w8, s, dtype=w.dtype)


# ---------------------------------------------------------------------------------------------- QAT (STE)
class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, mode):
        if mode == "1x16":
            return fake_quantize(w)
        if mode == "16x16":
            return fake_quantize_2d(w)
        if mode == "fp8":
            return fake_quantize_fp8(w)
        raise ValueError(f"unknown fake-quant mode {mode!r} (expected '1x16', '16x16' or 'fp8')")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_ste(w: torch.Tensor, mode: str = "1x16") -> torch.Tensor:
    """Fake quantization with a straight-through gradient (ModelOpt QAT's pass-through backward).

    ``mode``: ``"1x16"`` (NVFP4 blocks along the last dim), ``"16x16"`` (NVFP4 2-D tiles) or ``"fp8"`` (per-tensor)."""
    return _FakeQuantSTE.apply(w, mode)


# ---------------------------------------------------------------------------------------------- 128x4 swizzle
def swizzle_scales(scale: torch.Tensor) -> torch.Tensor:
    """Linear [R, C] block scales -> the flat "128x4" tiled layout used by Blackwell FP4 GEMMs (runtime only;
    HF checkpoints keep the linear layout). Rows are padded to 128 and columns to 4 with zeros.
    ``offset(r, c) = ((r//128 * Cpad/4 + c//4) * 32 + r%32) * 16 + (r%128)//32 * 4 + c%4``."""
    r, c = scale.shape
    rp, cp = -(-r // 128) * 128, -(-c // 4) * 4
    padded = scale.view(torch.uint8) if scale.dtype == FP8_DTYPE else scale
    buf = torch.zeros(rp, cp, dtype=padded.dtype, device=scale.device)
    buf[:r, :c] = padded
    # [rb, i(4), j(32), cb, cc(4)] -> [rb, cb, j, i, cc]
    out = buf.view(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4).reshape(-1)
    return out.view(FP8_DTYPE) if scale.dtype == FP8_DTYPE else out


def unswizzle_scales(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_scales`: flat tiled layout -> linear [rows, cols]."""
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    data = flat.view(torch.uint8) if flat.dtype == FP8_DTYPE else flat
    lin = data.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(rp, cp)[:rows, :cols]
    lin = lin.contiguous()
    return lin.view(FP8_DTYPE) if flat.dtype == FP8_DTYPE else lin

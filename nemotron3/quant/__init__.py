"""Quantization formats: NVFP4 (E2M1 + E4M3 block scales + FP32 tensor scale) and FP8 E4M3 per-tensor,
weight-only quantized linear / routed-expert modules that keep the packed tensors under Model-Optimizer names,
recipes (``recipe``), whole-model quantization (``quantize``) and ModelOpt checkpoint metadata (``modelopt``)."""
from .linear import FP8Linear, NVFP4Linear
from .nvfp4 import (
    BLOCK, E2M1_VALUES, dequantize, dequantize_2d, dequantize_fp8, e2m1_decode, e2m1_encode, encode_with_scales,
    expand_tile_scales, fake_quantize, fake_quantize_2d, fake_quantize_fp8, fake_quantize_ste, global_scale, pack,
    quantize, quantize_2d, quantize_fp8, swizzle_scales, unpack, unswizzle_scales,
)

__all__ = [
    "BLOCK", "E2M1_VALUES", "FP8Linear", "NVFP4Linear", "dequantize", "dequantize_2d", "dequantize_fp8",
    "e2m1_decode", "e2m1_encode", "encode_with_scales", "expand_tile_scales", "fake_quantize", "fake_quantize_2d",
    "fake_quantize_fp8", "fake_quantize_ste", "global_scale", "pack", "quantize", "quantize_2d", "quantize_fp8",
    "swizzle_scales", "unpack", "unswizzle_scales",
]

"""Quantization recipes: (config, module name) -> "nvfp4" | "fp8" | "bf16", and an analytic bits-per-element report.

Module names are ours = the checkpoint's (`backbone.layers.{i}.mixer.in_proj`, `...mixer.experts` for the fused
routed experts, whose on-disk names `...mixer.experts.{e}.up_proj` are accepted too). Anything that is not a
linear (embeddings, norms, Mamba `conv1d`, A_log/D/dt_bias, the `TopkRouter` `mixer.gate`) is always "bf16".
Reference: `shared/reference/nvfp4.md` §3.

* ``nvfp4`` (NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4, `hf_quant_config.json` quant_algo NVFP4, §3.1): every linear
  NVFP4 except `lm_head`, all attention q/k/v/o_proj, and the Mamba in_proj/out_proj of the Mamba layer just
  before each attention layer (Nano excludes layers {4,11,18,...}.mixer.{in,out}_proj before {5,12,19,...}; when
  an attention layer is not directly preceded by a Mamba layer we take the nearest preceding one). Routers,
  conv1d, latent-MoE projections (ModelOpt's `mamba_moe_nvfp4` presets disable them) and MTP stay BF16.
* ``nvfp4-mixed`` (Super/Ultra, ModelOpt `Nemotron-3-Super-120B-A12B-BF16/ptq/nvfp4-max-calib.yaml`, exported as
  MIXED_PRECISION, §3.2): routed experts (`*mixer.experts.*`) NVFP4, shared experts and Mamba in/out_proj FP8
  per-tensor; everything else (attention, embeddings, lm_head, routers, latent projections, dense MLPs, MTP) BF16.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from ..config import NemotronConfig

FORMATS = ("nvfp4", "fp8", "bf16")
# storage bits per weight element (§3.3): NVFP4 4-bit code + one E4M3 scale per 16; FP8 one byte; BF16 two
ELEMENT_BITS = {"nvfp4": 4 + 8 / 16, "fp8": 8.0, "bf16": 16.0}
# fp32 scalars per stored tensor: NVFP4 weight_scale_2 + input_scale, FP8 weight_scale + input_scale
TENSOR_BITS = {"nvfp4": 64, "fp8": 64, "bf16": 0}

_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.(.+)$")


def _split(name: str):
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def pre_attention_mamba(config: NemotronConfig) -> set[int]:
    """Indices of the Mamba layer nearest before each attention layer (Nano NVFP4 keeps these in BF16)."""
    out = set()
    for i, ch in enumerate(config.pattern):
        if ch == "*":
            j = config.pattern.rfind("M", 0, i)
            if j >= 0:
                out.add(j)
    return out


def _is_expert(sub: str) -> bool:
    return sub == "experts" or sub.startswith("experts.")


def nvfp4_recipe(config: NemotronConfig, name: str) -> str:
    """Nano NVFP4 recipe (see module docstring)."""
    i, sub = _split(name)
    if i is None:                                   # lm_head, embeddings, norm_f, mtp.*
        return "bf16"
    kind = config.pattern[i]
    if kind == "M":
        return ("bf16" if i in pre_attention_mamba(config) else "nvfp4") if sub in ("in_proj", "out_proj") else "bf16"
    if kind == "E":
        return "nvfp4" if _is_expert(sub) or sub.startswith("shared_experts.") and sub.endswith("_proj") else "bf16"
    if kind == "-":
        return "nvfp4" if sub in ("up_proj", "down_proj") else "bf16"
    return "bf16"                                   # attention


def nvfp4_mixed_recipe(config: NemotronConfig, name: str) -> str:
    """Super/Ultra MIXED_PRECISION recipe (see module docstring)."""
    i, sub = _split(name)
    if i is None:
        return "bf16"
    kind = config.pattern[i]
    if kind == "M" and sub in ("in_proj", "out_proj"):
        return "fp8"
    if kind == "E" and _is_expert(sub):
        return "nvfp4"
    if kind == "E" and sub in ("shared_experts.up_proj", "shared_experts.down_proj"):
        return "fp8"
    return "bf16"


RECIPES: dict[str, Callable[[NemotronConfig, str], str]] = {"nvfp4": nvfp4_recipe, "nvfp4-mixed": nvfp4_mixed_recipe}


def get_recipe(recipe) -> Callable[[NemotronConfig, str], str]:
    if callable(recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; available: {', '.join(RECIPES)}")
    return RECIPES[recipe]


def _weights(config: NemotronConfig):
    """(module name, attr, numel, tensors on disk) for every parameter, from a model built on the meta device."""
    from ..model import NemotronHForCausalLM
    from ..model.moe import Experts
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    for mod_name, mod in model.named_modules():
        for attr, p in mod.named_parameters(recurse=False):
            n_tensors = p.shape[0] if isinstance(mod, Experts) else 1
            yield mod_name, attr, p.numel(), n_tensors, isinstance(mod, (torch.nn.Linear, Experts)) and attr != "bias"


def bits_per_element(config: NemotronConfig, recipe) -> dict:
    """Analytic storage report of a recipe over ALL parameters (embeddings, norms, conv1d, routers, MTP included;
    the fp32 router-bias buffers are not parameters and are left out).

    Convention (reference §3.3): NVFP4 = 4 + 8/16 = 4.5 bits, FP8 = 8, BF16 = 16 per element, plus 64 bits per
    quantized tensor for its two fp32 scalars (per expert for routed experts). `bits_per_element` is the
    average, equal to 16 x quantized bytes / BF16 bytes (the Ultra blog's 352.3 GB / 1121 GB -> 5.03).
    Only linear weights follow the recipe; biases stay BF16."""
    fn = get_recipe(recipe)
    params = {f: 0 for f in FORMATS}
    tensors = {f: 0 for f in FORMATS}
    for mod_name, attr, numel, n_tensors, quantizable in _weights(config):
        f = fn(config, mod_name) if quantizable else "bf16"
        params[f] += numel
        tensors[f] += n_tensors
    total = sum(params.values())
    bits = sum(params[f] * ELEMENT_BITS[f] + tensors[f] * TENSOR_BITS[f] for f in FORMATS)
    return {"recipe": recipe if isinstance(recipe, str) else getattr(recipe, "__name__", "custom"),
            "params": params, "fraction": {f: params[f] / total for f in FORMATS},
            "quantized_tensors": {f: tensors[f] for f in ("nvfp4", "fp8")},
            "bits_per_element": bits / total, "bytes": bits / 8, "bytes_bf16": 2 * total,
            "compression_vs_bf16": 16 * total / bits}


def format_bits_report(config: NemotronConfig, recipe) -> str:
    r = bits_per_element(config, recipe)
    fr = r["fraction"]
    gb = lambda b: f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"   # noqa: E731
    return (f"  recipe {r['recipe']}: {r['bits_per_element']:.3f} bits/element over all parameters "
            f"(NVFP4 {fr['nvfp4']:.1%} x 4.5, FP8 {fr['fp8']:.1%} x 8, BF16 {fr['bf16']:.1%} x 16); "
            f"{gb(r['bytes'])} vs {gb(r['bytes_bf16'])} bf16 ({r['compression_vs_bf16']:.2f}x)")

"""NVIDIA Model Optimizer ("modelopt") Hugging Face checkpoint metadata: write and read (reference §2.2, §2.4).

Writing (called by ``checkpoint.save`` when the model holds quantized modules):

* ``hf_quant_config.json``: ``{"producer": {"name": "modelopt", "version": ...}, "quantization": {...}}`` with
  ``quant_algo "NVFP4"`` + ``exclude_modules`` (the BF16 linears; ``mtp.*`` / ``<experts>.*`` as wildcards) when
  every quantized module is NVFP4 (Nano layout), ``"FP8"`` likewise, or ``"MIXED_PRECISION"`` +
  ``quantized_layers`` {module: {"quant_algo": "NVFP4", "group_size": 16} | {"quant_algo": "FP8"}} with routed
  experts listed per expert (``...experts.{e}.up_proj``), as ModelOpt's ``process_layer_quant_config``.
  ``kv_cache_quant_algo`` is null (our KV cache is not quantized). A model quantized without calibration has no
  ``input_scale`` tensors and is labelled ``W4A16_NVFP4`` (weight-only) instead of ``NVFP4``.
* ``config.json["quantization_config"]``: what ModelOpt's ``convert_hf_quant_config_format`` writes there
  (``config_groups`` for NVFP4 / FP8, ``ignore`` = the exclude list, ``quant_algo``, ``kv_cache_scheme`` when the
  KV cache is quantized, ``producer``, ``quant_method: "modelopt"``), plus ``quantized_layers`` for
  MIXED_PRECISION. vLLM reads this block in preference to ``hf_quant_config.json`` and, having no
  ``quantization`` key there, takes the exclude list from ``ignore`` only (an ``exclude_modules`` key in it is
  ignored, so the BF16 layers would be built as quantized) and the mixed layers from ``quantized_layers``.
* tensors (ModelOpt dtypes/shapes): NVFP4 ``weight`` uint8 [N, K/2], ``weight_scale`` float8_e4m3fn [N, K/16],
  ``weight_scale_2`` fp32 [], ``input_scale`` fp32 []; FP8 ``weight`` float8_e4m3fn [N, K], ``weight_scale``
  fp32 [], ``input_scale`` fp32 []; routed experts per expert (``checkpoint.py`` splits them).

Reading: :func:`read_quant_config` accepts ``hf_quant_config.json`` and/or ``quantization_config`` (modelopt
only; compressed-tensors and other algos are refused with a clear error); :func:`layout_from_tensors` decides
each module's format from the stored weight dtype (uint8 -> NVFP4, float8_e4m3fn -> FP8), so a checkpoint laid
out like NVIDIA's loads whatever wildcards its exclude list uses. FP8 KV-cache scales (``k_scale``/``v_scale``)
are accepted and ignored (the KV cache stays in the activation dtype).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..model.moe import Experts
from .quantize import NVFP4Experts, quantized_module_formats

PRODUCER = {"name": "modelopt", "version": "0.29.0 (nemotron3 writer)"}
SUPPORTED_ALGOS = {"NVFP4", "W4A16_NVFP4", "FP8", "MIXED_PRECISION"}
IGNORED_SUFFIXES = (".k_scale", ".v_scale")
_ALGO = {"nvfp4": "NVFP4", "fp8": "FP8"}


def _per_expert(name: str, n_experts: int) -> list[str]:
    return [f"{name}.{e}.{p}" for e in range(n_experts) for p in ("up_proj", "down_proj")]


def hf_quant_config(model: nn.Module) -> dict:
    """The ``hf_quant_config.json`` dict for a model holding quantized modules."""
    formats = quantized_module_formats(model)
    if not formats:
        raise ValueError("model holds no quantized modules; run quant.quantize_model first")
    mods = dict(model.named_modules())
    calibrated = all(getattr(mods[n], "input_scale", None) is not None or
                     getattr(mods[n], "up_proj_input_scale", None) is not None for n in formats)
    q = {"quant_algo": None, "kv_cache_quant_algo": None}          # ModelOpt get_quant_config key order
    algos = set(formats.values())
    if len(algos) == 1:
        algo = _ALGO[algos.pop()]
        q["quant_algo"] = "W4A16_NVFP4" if algo == "NVFP4" and not calibrated else algo
        if algo == "NVFP4":
            q["group_size"] = 16
        exclude = []
        mtp_wild = any(n.startswith("mtp.") for n in mods) and not any(n.startswith("mtp.") for n in formats)
        for n, m in mods.items():
            if n in formats or not isinstance(m, (nn.Linear, Experts)) or mtp_wild and n.startswith("mtp."):
                continue
            exclude.append(f"{n}.*" if isinstance(m, Experts) else n)
        if mtp_wild:
            exclude.append("mtp.*")
        q["exclude_modules"] = exclude
    else:
        q["quant_algo"] = "MIXED_PRECISION"
        layers = {}
        for n, f in formats.items():
            spec = {"quant_algo": "NVFP4", "group_size": 16} if f == "nvfp4" else {"quant_algo": "FP8"}
            names = _per_expert(n, mods[n].n_experts) if isinstance(mods[n], NVFP4Experts) else [n]
            layers.update({k: dict(spec) for k in names})
        q["quantized_layers"] = layers
    return {"producer": dict(PRODUCER), "quantization": q}


def config_block(hf: dict) -> dict:
    """``config.json["quantization_config"]`` for an ``hf_quant_config.json`` dict: ModelOpt's
    ``convert_hf_quant_config_format`` (modelopt/torch/export/convert_hf_config.py) output, plus
    ``quantized_layers`` for MIXED_PRECISION (which vLLM's ``modelopt_mixed`` needs in this block)."""
    q = hf["quantization"]
    algo = q.get("quant_algo")
    out: dict = {}
    if algo == "FP8":
        fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
        out["config_groups"] = {"group_0": {"input_activations": dict(fp8), "weights": dict(fp8),
                                            "targets": ["Linear"]}}
    elif algo == "NVFP4":
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": q.get("group_size", 16)}
        out["config_groups"] = {"group_0": {"input_activations": dict(fp4), "weights": dict(fp4),
                                            "targets": ["Linear"]}}
    out["ignore"] = list(q.get("exclude_modules") or [])
    if algo:
        out["quant_algo"] = algo
    kv = q.get("kv_cache_quant_algo")
    if kv:
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"} if kv == "FP8" else kv
    if algo == "MIXED_PRECISION":
        out["quantized_layers"] = q["quantized_layers"]
    out["producer"] = hf["producer"]
    out["quant_method"] = "modelopt"
    return out


def _from_config_block(qc: dict) -> dict:
    """The ``hf_quant_config.json["quantization"]`` view of a ``config.json`` quantization block (either our /
    ModelOpt's converted form with ``ignore`` / ``config_groups`` / ``kv_cache_scheme``, or a flattened one)."""
    q = dict(qc)
    if "exclude_modules" not in q and "ignore" in q:
        q["exclude_modules"] = q["ignore"]
    if "group_size" not in q:
        w = ((q.get("config_groups") or {}).get("group_0") or {}).get("weights") or {}
        if "group_size" in w:
            q["group_size"] = w["group_size"]
    if "kv_cache_quant_algo" not in q:
        kv = q.get("kv_cache_scheme")
        q["kv_cache_quant_algo"] = ("FP8" if isinstance(kv, dict) and kv.get("num_bits") == 8
                                    and kv.get("type") == "float" else kv if isinstance(kv, str) else None)
    return q


def write_hf_quant_config(model: nn.Module, path: Path) -> dict:
    hf = hf_quant_config(model)
    tmp = Path(path) / "hf_quant_config.json.tmp"
    tmp.write_text(json.dumps(hf, indent=2) + "\n")
    tmp.replace(Path(path) / "hf_quant_config.json")
    return hf


def read_quant_config(path: Path, extra: dict) -> dict | None:
    """The quantization block of a model directory (None when unquantized); ValueError for unsupported ones."""
    q = None
    f = Path(path) / "hf_quant_config.json"
    if f.exists():
        try:
            q = json.loads(f.read_text())["quantization"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not a valid ModelOpt hf_quant_config.json ({e})") from None
    qc = extra.get("quantization_config")
    if q is None and qc is not None:
        method = str(qc.get("quant_method", "modelopt")).lower()
        if method != "modelopt":
            raise ValueError(f"{path}: quantization method {method!r} is not supported (only NVIDIA ModelOpt "
                             f"checkpoints: quant_method 'modelopt' with quant_algo {sorted(SUPPORTED_ALGOS)})")
        q = _from_config_block(qc)
    if q is None:
        return None
    algo = str(q.get("quant_algo", "")).upper()
    if algo not in SUPPORTED_ALGOS:
        raise ValueError(f"{path}: ModelOpt quant_algo {q.get('quant_algo')!r} is not supported "
                         f"(supported: {', '.join(sorted(SUPPORTED_ALGOS))})")
    if algo == "MIXED_PRECISION":
        bad = sorted({str(v.get("quant_algo")) for v in q.get("quantized_layers", {}).values()}
                     - {"NVFP4", "FP8", "W4A16_NVFP4"})
        if bad:
            raise ValueError(f"{path}: MIXED_PRECISION layer algo(s) {bad} not supported (NVFP4 and FP8 are)")
    if algo in ("NVFP4", "W4A16_NVFP4") and int(q.get("group_size", 16)) != 16:
        raise ValueError(f"{path}: NVFP4 group_size {q.get('group_size')} != 16")
    return q


def layout_from_tensors(model: nn.Module, dtype_of) -> tuple[dict[str, str], set[str]]:
    """({module: "nvfp4" | "fp8"}, {modules with an input_scale}) from stored tensors; ``dtype_of(name)`` gives a
    stored tensor's safetensors dtype string ("U8", "F8_E4M3", ...) or None when absent."""
    formats, inputs = {}, set()
    for n, m in model.named_modules():
        if isinstance(m, Experts):
            w, s = f"{n}.0.up_proj.weight", f"{n}.0.up_proj.input_scale"
        elif isinstance(m, nn.Linear):
            w, s = f"{n}.weight", f"{n}.input_scale"
        else:
            continue
        dt = dtype_of(w)
        if dt in ("U8", "F8_E4M3"):
            formats[n] = "nvfp4" if dt == "U8" else "fp8"
            if dtype_of(s) is not None:
                inputs.add(n)
    return formats, inputs

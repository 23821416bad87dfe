"""NVIDIA Model Optimizer ("modelopt") Hugging Face checkpoint metadata: write and read (reference §2.2, §2.4).

Writing (called by ``checkpoint.save`` when the model holds quantized modules):

* ``hf_quant_config.json``: ``{"producer": {"name": "modelopt", "version": ...}, "quantization": {...}}`` with
  ``quant_algo "NVFP4"`` + ``exclude_modules`` when every quantized module is NVFP4 (Nano layout), ``"FP8"``
  likewise, or ``"MIXED_PRECISION"`` + ``quantized_layers`` {module: {"quant_algo": "NVFP4", "group_size": 16} |
  {"quant_algo": "FP8"}} with routed experts listed per expert (``...experts.{e}.up_proj``), as ModelOpt's
  ``process_layer_quant_config``. The exclude list is ordered as NVIDIA's Nano NVFP4 file: ``lm_head``, the BF16
  linears in layer order, then every Mamba ``conv1d`` (ModelOpt wraps Conv1d and exports it unquantized), then
  wildcards (BF16 routed experts ``<experts>.*``, ``mtp.*``). ``kv_cache_quant_algo`` is ``"FP8"`` when the
  attention layers carry K/V scales (``quantize_model(..., kv_cache_dtype="fp8")``), else null. A model quantized
  without calibration has no ``input_scale`` tensors and is labelled ``W4A16_NVFP4`` (weight-only).
* ``config.json["quantization_config"]``: what ModelOpt's ``convert_hf_quant_config_format`` writes there
  (``config_groups`` (for MIXED_PRECISION one group per distinct layer format, targets sorted), ``quantized_layers``
  for MIXED_PRECISION, ``ignore`` = the exclude list, ``quant_algo``, ``kv_cache_scheme`` when the KV cache is
  quantized, ``producer``, ``quant_method: "modelopt"``), as in NVIDIA's Super NVFP4 ``config.json``. vLLM reads
  this block in preference to ``hf_quant_config.json``, the exclude list from ``ignore`` only.
* tensors (ModelOpt dtypes/shapes): NVFP4 ``weight`` uint8 [N, K/2], ``weight_scale`` float8_e4m3fn [N, K/16],
  ``weight_scale_2`` fp32 [], ``input_scale`` fp32 []; FP8 ``weight`` float8_e4m3fn [N, K], ``weight_scale``
  fp32 [], ``input_scale`` fp32 []; routed experts per expert; FP8 KV cache ``...mixer.k_proj.k_scale`` /
  ``...mixer.v_proj.v_scale`` fp32 [] (``checkpoint.py`` writes and reads these).

Reading: :func:`read_quant_config` accepts ``hf_quant_config.json`` and/or ``quantization_config`` (modelopt
only; compressed-tensors, other algos and KV-cache algos other than FP8 are refused with a clear error);
:func:`layout_from_tensors` decides each module's format from the stored weight dtype (uint8 -> NVFP4,
float8_e4m3fn -> FP8), so any per-module map (NVIDIA's irregular MIXED_PRECISION ones included) loads whatever
wildcards its exclude list uses.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..model.attention import Attention
from ..model.moe import Experts
from .quantize import NVFP4Experts, quantized_module_formats

PRODUCER = {"name": "modelopt", "version": "0.29.0 (nemotron3 writer)"}
SUPPORTED_ALGOS = {"NVFP4", "W4A16_NVFP4", "FP8", "MIXED_PRECISION"}
SUPPORTED_KV_ALGOS = {"FP8"}
_ALGO = {"nvfp4": "NVFP4", "fp8": "FP8"}


def _per_expert(name: str, n_experts: int) -> list[str]:
    return [f"{name}.{e}.{p}" for e in range(n_experts) for p in ("up_proj", "down_proj")]


def kv_cache_scales(model: nn.Module) -> dict[str, tuple[float, float]]:
    """{attention module name: (k_scale, v_scale)} of the layers that declare an FP8 KV cache."""
    return {n: (m.k_scale, 1.0 if m.v_scale is None else m.v_scale) for n, m in model.named_modules()
            if isinstance(m, Attention) and m.k_scale is not None}


def hf_quant_config(model: nn.Module) -> dict:
    """The ``hf_quant_config.json`` dict for a model holding quantized modules."""
    formats = quantized_module_formats(model)
    if not formats:
        raise ValueError("model holds no quantized modules; run quant.quantize_model first (an FP8 KV cache is "
                         "written together with quantized weights)")
    mods = dict(model.named_modules())
    calibrated = all(getattr(mods[n], "input_scale", None) is not None or
                     getattr(mods[n], "up_proj_input_scale", None) is not None for n in formats)
    kv = bool(kv_cache_scales(model))
    q = {"quant_algo": None, "kv_cache_quant_algo": "FP8" if kv else None}   # ModelOpt get_quant_config key order
    algos = set(formats.values())
    if len(algos) == 1:
        algo = _ALGO[algos.pop()]
        q["quant_algo"] = "W4A16_NVFP4" if algo == "NVFP4" and not calibrated else algo
        if algo == "NVFP4":
            q["group_size"] = 16
        mtp_wild = any(n.startswith("mtp.") for n in mods) and not any(n.startswith("mtp.") for n in formats)
        kept = {n: m for n, m in mods.items() if n not in formats and not (mtp_wild and n.startswith("mtp."))}
        linears = [n for n, m in kept.items() if isinstance(m, nn.Linear)]
        q["exclude_modules"] = (sorted(linears, key=lambda n: n != "lm_head")
                                + [n for n, m in kept.items() if isinstance(m, nn.Conv1d)]
                                + [f"{n}.*" for n, m in kept.items() if isinstance(m, Experts)]
                                + (["mtp.*"] if mtp_wild else []))
    else:
        q["quant_algo"] = "MIXED_PRECISION"
        layers = {}
        for n, f in formats.items():
            spec = {"quant_algo": "NVFP4", "group_size": 16} if f == "nvfp4" else {"quant_algo": "FP8"}
            names = _per_expert(n, mods[n].n_experts) if isinstance(mods[n], NVFP4Experts) else [n]
            layers.update({k: dict(spec) for k in names})
        q["quantized_layers"] = layers
    return {"producer": dict(PRODUCER), "quantization": q}


def _group(algo: str, group_size) -> dict:
    """A compressed-tensors config group body for a ModelOpt layer algo (``_quant_algo_to_group_config``)."""
    if algo == "FP8":
        fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
        return {"input_activations": dict(fp8), "weights": dict(fp8)}
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size or 16}
    return {"input_activations": dict(fp4), "weights": dict(fp4)}


def config_block(hf: dict) -> dict:
    """``config.json["quantization_config"]`` for an ``hf_quant_config.json`` dict: ModelOpt's
    ``convert_hf_quant_config_format`` (modelopt/torch/export/convert_hf_config.py) output (``quantized_layers``
    kept for MIXED_PRECISION, which vLLM's ``modelopt_mixed`` reads from this block)."""
    q = hf["quantization"]
    algo = q.get("quant_algo")
    out: dict = {}
    if algo in ("FP8", "NVFP4"):
        out["config_groups"] = {"group_0": {**_group(algo, q.get("group_size")), "targets": ["Linear"]}}
    elif algo == "MIXED_PRECISION":
        groups: dict[tuple, list[str]] = {}
        for name, spec in q["quantized_layers"].items():
            groups.setdefault(tuple(sorted(spec.items())), []).append(name)
        out["config_groups"] = {f"group_{i}": {**_group(dict(k)["quant_algo"], dict(k).get("group_size")),
                                               "targets": sorted(names)}
                                for i, (k, names) in enumerate(groups.items())}
        out["quantized_layers"] = q["quantized_layers"]
    out["ignore"] = list(q.get("exclude_modules") or [])
    if algo:
        out["quant_algo"] = algo
    kv = q.get("kv_cache_quant_algo")
    if kv:
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"} if kv == "FP8" else kv
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


def declares_fp8_kv(q: dict | None) -> bool:
    """Whether a quantization block (`read_quant_config`) declares an FP8 KV cache (`kv_cache_quant_algo`)."""
    return q is not None and str(q.get("kv_cache_quant_algo")).upper() == "FP8"


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
    kv = q.get("kv_cache_quant_algo")
    if kv is not None and str(kv).upper() not in SUPPORTED_KV_ALGOS:
        raise ValueError(f"{path}: kv_cache_quant_algo {kv!r} is not supported (supported: FP8, or null)")
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

"""Load and save Hugging Face `nemotron_h` model directories (config.json + safetensors).

Reading accepts what exists in the wild: one `model.safetensors`, shards listed by
`model.safetensors.index.json`, or loose `*.safetensors`; names with the checkpoint prefix `backbone.`
or transformers' in-memory prefix `model.`; the old `backbone.embedding.weight`; a `language_model.`
wrapper prefix; routed experts per expert (`experts.{e}.up_proj.weight`, NVIDIA's and transformers'
on-disk layout) or fused 3-D (`experts.up_proj` [E, I, l], transformers' in-memory layout); `mtp.*`.
Loading is lazy (`lazy=True`): a tensor stored in the dtype the model holds it in becomes a view of the file's
private, copy-on-write mapping (`safetensors_io.MappedFile`), so resident memory is the pages actually used, and
one MoE layer's per-expert tensors lying back to back in expert order (as `save` writes them) become one
[E, ...] view. The NaN / inf scan streams over such a view and unmaps its pages again (`drop_pages`). Tensors
stored in another dtype, or not laid out for a view (other writers' expert order), are read and converted one
at a time into a model built on the meta device: peak memory is then the model plus one tensor (one MoE
layer's experts while they are stacked). `weight_dtype="bfloat16"` builds the model W16A32 (`quant.linear.
store_bf16`, plus lm_head and the embedding table) so a bf16 checkpoint maps in place. A mapped file must not be
rewritten in place while a model uses it (`save` writes a new file and renames it over, which is safe). Only
safetensors and JSON are read: pickle-based files are refused, never opened.

Writing produces the on-disk layout NVIDIA ships and transformers / vLLM read: `backbone.*` names,
per-expert tensors (one projection's experts back to back in expert order: `expert_order`), `mtp.*`, sharded
with an index above `max_shard_bytes`, files written to a temporary name and renamed.

Quantized checkpoints (NVIDIA Model Optimizer layout: `hf_quant_config.json` and/or a modelopt
`quantization_config`; `quant/modelopt.py`) load into a model whose linears / routed experts are swapped for
`quant` modules wherever the stored weight is packed NVFP4 (uint8) or FP8; their codes and scales keep their
dtypes (scales upcast to fp32). Saving a model that holds quantized modules writes that layout. A checkpoint
declaring `kv_cache_quant_algo: "FP8"` gives every attention layer its `k_scale` / `v_scale` (ModelOpt's
`...mixer.k_proj.k_scale` / `...mixer.v_proj.v_scale`, 1.0 when absent), kept as numbers on the `Attention`
module (not parameters: the engine's cache applies them); saving writes them back under those names.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .config import ConfigError, NemotronConfig
from .model import NemotronHForCausalLM
from .safetensors_io import MappedFile, drop_pages, save_file

# per-expert tensors on disk; ModelOpt's NVFP4 experts add weight_scale / weight_scale_2 / input_scale, held fused
# in memory as `experts.up_proj_weight_scale` etc. (see quant/quantize.py NVFP4Experts)
_QSUFFIX = "weight_scale_2|weight_scale|input_scale"
_EXPERT = re.compile(rf"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.(weight|{_QSUFFIX})$")
_KV_SCALE = re.compile(r"^(.*\.mixer)\.(k_proj\.k_scale|v_proj\.v_scale)$")     # FP8 KV cache (ModelOpt names)
_FUSED_EXPERT = re.compile(rf"^(.*\.mixer\.experts)\.(up_proj|down_proj)(?:_({_QSUFFIX}))?$")
_FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A model directory that does not hold a loadable nemotron_h checkpoint; the message says what is wrong."""


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}")


def canonical_name(name: str) -> str:
    """Map any accepted spelling of a tensor name to ours (the NVIDIA checkpoint name)."""
    if name.startswith("language_model."):
        name = name[len("language_model."):]
    if name.startswith("model."):
        name = "backbone." + name[len("model."):]
    if name == "backbone.embedding.weight":
        name = "backbone.embeddings.weight"
    return name


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory, in index order when there is an index."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {pickled}: pickle-based files are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
    return files


class TensorSource:
    """Lazy, name-normalised view of the tensors in a directory's safetensors files. `lazy`: tensors come as views
    of the files' private mappings (`load` keeps a view where its dtype is the one the model holds)."""

    def __init__(self, path: Path, lazy: bool = True):
        self.handles, self.maps = [], []
        self.where: dict[str, tuple[int, str]] = {}
        for f in safetensors_files(path):
            try:
                h = safe_open(str(f), framework="pt")
                self.maps.append(MappedFile(f) if lazy else None)
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            self.handles.append(h)
            for raw in h.keys():
                name = canonical_name(raw)
                if name in self.where:
                    raise CheckpointError(f"tensor {raw!r} appears twice (in {f.name} and another file)")
                self.where[name] = (len(self.handles) - 1, raw)

    def names(self):
        return self.where.keys()

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor: lazy, a view of our mapping (the caller converts it if need be, then `drop_pages`);
        eager, an in-memory copy (safetensors' own tensors sit on its file mapping)."""
        i, raw = self.where[name]
        if self.maps[i] is not None and (t := self.maps[i].view(raw)) is not None:
            return t
        return self.handles[i].get_tensor(raw).clone()

    def stacked(self, names: list[str], dtype: torch.dtype) -> torch.Tensor | None:
        """[len(names), *shape] view of tensors stored as `dtype` back to back in one file, in this order; else None."""
        files = {self.where[n][0] for n in names}
        if len(files) != 1 or self.maps[(i := files.pop())] is None:
            return None
        t = self.maps[i].stacked([self.where[n][1] for n in names])
        return t if t is not None and t.dtype == dtype else None

    def mapped(self, t: torch.Tensor) -> bool:
        return any(m is not None and m.holds(t) for m in self.maps)

    def dtype(self, name: str) -> str | None:
        """The stored safetensors dtype string ("BF16", "U8", "F8_E4M3", ...), None if absent."""
        if name not in self.where:
            return None
        i, raw = self.where[name]
        return self.handles[i].get_slice(raw).get_dtype()

    def shape(self, name: str) -> tuple:
        i, raw = self.where[name]
        return tuple(self.handles[i].get_slice(raw).get_shape())


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=mod._parameters[attr].requires_grad)
    else:
        mod._buffers[attr] = tensor


def _hold_bf16(model: NemotronHForCausalLM, tie: bool) -> None:
    """W16A32 on the meta model before loading: `store_bf16`'s swap, plus lm_head and the embedding table (rows
    widened as they are looked up) unless they are tied."""
    from .quant.linear import BF16Linear, store_bf16
    store_bf16(model)
    if not tie:
        if type(model.lm_head) is torch.nn.Linear:
            model.lm_head = BF16Linear.from_linear(model.lm_head)
        emb = model.backbone.embeddings
        emb.weight = torch.nn.Parameter(emb.weight.detach().bfloat16(), requires_grad=False)


def _check(name: str, t: torch.Tensor, expected: torch.Size, quant_dtype: torch.dtype | None = None,
           release: bool = False) -> None:
    if tuple(t.shape) != tuple(expected):
        raise CheckpointError(f"tensor {name}: expected shape {tuple(expected)}, found {tuple(t.shape)}")
    if quant_dtype is not None:       # packed codes / FP8 weights must match exactly; scales may be any float
        if t.dtype != quant_dtype and not (quant_dtype == torch.float32 and t.dtype in _FLOAT_DTYPES):
            raise CheckpointError(f"tensor {name}: expected {quant_dtype} for a quantized tensor, found {t.dtype}")
        if t.is_floating_point():     # FP8 weights and the scales; packed uint8 codes cannot be non-finite
            _check_finite(name, t, release)
        return
    if t.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name}: unsupported dtype {t.dtype} (expected float32, bfloat16 or float16)")
    _check_finite(name, t, release)


# float dtype -> (same-width int dtype, numpy unsigned view, mask, limit): NaN / inf iff (bits & mask) >= limit
# (exponent all ones; E4M3 has no inf, its NaN is S.1111.111)
_NONFINITE = {torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000),
              torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
              torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
              torch.float8_e4m3fn: (torch.uint8, np.uint8, 0x7F, 0x7F),
              torch.float8_e5m2: (torch.uint8, np.uint8, 0x7F, 0x7C)}
_CHUNK = 1 << 18


def _check_finite(name: str, t: torch.Tensor, release: bool = False) -> None:
    """NaN / inf in a weight or scale is refused, naming the tensor (a model of NaNs would load and serve
    garbage). One streaming pass over the bits (numpy; torch's bf16 / fp8 isfinite runs at ~15 M elements/s
    here, this at ~2-4 G), in 256K-element chunks so the temporary stays small; `release` (a view of a file
    mapping) unmaps each chunk's pages once read, so the scan never holds the tensor resident."""
    flat = t.reshape(-1)
    if flat.dtype not in _NONFINITE:
        if not torch.isfinite(flat).all():
            raise CheckpointError(f"tensor {name}: holds non-finite values (NaN or inf); the checkpoint is damaged")
        return
    idt, npt, mask, limit = _NONFINITE[flat.dtype]
    buf = np.empty(min(_CHUNK, flat.numel()), npt)
    for i in range(0, flat.numel(), _CHUNK):
        chunk = flat[i:i + _CHUNK]
        b = buf[:chunk.numel()]
        np.bitwise_and(chunk.view(idt).numpy().view(npt), mask, out=b)
        if b.max() >= limit:
            raise CheckpointError(f"tensor {name}: holds non-finite values (NaN or inf); the checkpoint is damaged")
        if release:
            drop_pages(chunk)


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (e.g. trainer state); a damaged file is a CheckpointError naming it."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers and short files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def parse_weight_dtype(weight_dtype):
    """A weight storage choice: "auto", or the dtype weights are held in (None = the activation dtype, which
    "float32" also means here; torch.bfloat16 = W16A32). ValueError for anything else."""
    if weight_dtype == "auto":
        return "auto"
    held = _DTYPE_NAMES.get(weight_dtype, weight_dtype) if isinstance(weight_dtype, str) else weight_dtype
    if held not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"weight_dtype must be 'auto', 'float32' or 'bfloat16', got {weight_dtype!r}")
    return None if held == torch.float32 else held


def resolve_weight_dtype(weight_dtype, config: NemotronConfig, dtype: torch.dtype, device) -> torch.dtype | None:
    """`load`'s weight storage (`parse_weight_dtype`); "auto" (the engine's default) = bfloat16 when the
    checkpoint stores bf16 (`torch_dtype`) and activations are fp32 on CPU: the stored values exactly (bf16
    widens to fp32 without rounding), half the bytes per decode step of fp32 copies, measured faster on every
    path (bench/RESULTS.md)."""
    held = parse_weight_dtype(weight_dtype)
    if held == "auto":
        keep = config.torch_dtype == "bfloat16" and dtype == torch.float32 and torch.device(device).type == "cpu"
        return torch.bfloat16 if keep else None
    return held


def load(path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu",
         config: NemotronConfig | None = None, lazy: bool = True, weight_dtype=None) -> NemotronHForCausalLM:
    """Load a model directory. `dtype` None keeps float32 on CPU (fast matmuls everywhere) and the
    checkpoint's `torch_dtype` on accelerators; the router's `e_score_correction_bias` stays fp32.
    `weight_dtype` "bfloat16": linears (lm_head too, unless tied), routed experts and the embedding table held
    in bf16 with `dtype` activations (W16A32); "auto": that for bf16 checkpoints on CPU (`resolve_weight_dtype`).
    `lazy`: CPU tensors stored in the held dtype map the file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} " + ("is a file, not a directory (pass the folder holding "
                              "config.json and the safetensors)" if path.exists() else "does not exist"))
    config = config or NemotronConfig.from_json_file(path)
    from .model.attention import Attention
    from .quant.modelopt import declares_fp8_kv, layout_from_tensors, read_quant_config
    try:
        quant = read_quant_config(path, config.extra)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    dtype = parse_dtype(dtype)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else \
            _DTYPE_NAMES[config.torch_dtype or "bfloat16"]
    weight_dtype = resolve_weight_dtype(weight_dtype, config, dtype, device)
    src = TensorSource(path, lazy=lazy and torch.device(device).type == "cpu")
    if config.has_mtp and not any(n.startswith("mtp.") for n in src.names()):
        # e.g. saved by transformers, which has no MTP module: load the backbone, drafting unavailable
        warnings.warn(f"{path}: config has num_nextn_predict_layers={config.num_nextn_predict_layers} but the "
                      "checkpoint holds no mtp.* tensors; loading without the MTP block")
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    qnames: dict[str, torch.dtype] = {}
    if quant is not None:             # ModelOpt checkpoint: swap in quantized modules where weights are stored packed
        from .quant.quantize import apply_layout, quant_state_names
        try:
            apply_layout(model, *layout_from_tensors(model, src.dtype))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        sd = model.state_dict()
        qnames = {n: sd[n].dtype for n in quant_state_names(model) if n in sd}
    tied = config.tie_word_embeddings and "lm_head.weight" not in src.names()
    if weight_dtype is not None:
        _hold_bf16(model, tie=config.tie_word_embeddings)
    sd = model.state_dict()
    held16 = {n for n, t in sd.items() if t.dtype == torch.bfloat16 and n not in qnames} if weight_dtype else set()
    expected = {k: v.shape for k, v in sd.items()}
    # tie_word_embeddings: share the embedding unless the file has its own, different lm_head (transformers'
    # NemotronH never ties, so its checkpoints -- and ours -- carry lm_head.weight even when the flag is set)
    if tied:
        expected.pop("lm_head.weight", None)

    # Group per-expert tensors by (layer, projection); everything else maps by name.
    experts: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    direct, unexpected, kv_names = {}, [], {}
    attention = {n for n, m in model.named_modules() if isinstance(m, Attention)}
    for name in src.names():
        m = _EXPERT.match(name)
        fused = m and f"{m.group(1)}.{m.group(3)}" + ("" if m.group(4) == "weight" else f"_{m.group(4)}")
        if m and fused in expected:
            experts[(m.group(1), fused[len(m.group(1)) + 1:])][int(m.group(2))] = name
        elif name in expected:
            direct[name] = name
        elif name.startswith("mtp.") and not config.has_mtp:
            continue                     # as transformers: MTP weights ignored by a model without MTP
        elif quant is not None and (k := _KV_SCALE.match(name)) and k.group(1) in attention:
            kv_names[(k.group(1), k.group(2)[0])] = name     # used only if the config declares an FP8 KV cache
        else:
            unexpected.append(name)
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) for this config, e.g. {unexpected[:5]}")
    for (prefix, proj), got in experts.items():
        fused = f"{prefix}.{proj}"
        if fused in direct:
            raise CheckpointError(f"{fused} is stored both fused and per expert")
        n = expected[fused][0]
        missing_e = sorted(set(range(n)) - set(got))
        extra_e = sorted(set(got) - set(range(n)))
        if missing_e or extra_e:
            raise CheckpointError(f"{fused}: expected experts 0..{n - 1}; missing {missing_e[:8]}, extra {extra_e[:8]}")
    missing = sorted(set(expected) - set(direct) - {f"{p}.{j}" for p, j in experts})
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from {path}: {missing[:8]}")

    def held(n: str) -> torch.dtype:     # the dtype the model keeps tensor n in
        return qnames.get(n) or (torch.bfloat16 if n in held16 else
                                 torch.float32 if n.endswith("e_score_correction_bias") else dtype)

    for name in direct:
        t = src.get(name)
        if name in qnames and expected[name] == () and t.shape == (1,):
            t = t.reshape(())            # some exports store scalar scales as [1]
        mapped = src.mapped(t)
        _check(name, t, expected[name], qnames.get(name), release=mapped)
        _assign(model, name, t.to(device=device, dtype=held(name)))     # the view itself when stored as held
        if mapped:
            drop_pages(t)                # read (scanned / converted): resident again only where decoding touches
    for (prefix, proj), got in experts.items():
        fused = f"{prefix}.{proj}"
        names = [got[e] for e in range(len(got))]
        view = src.stacked(names, held(fused))                              # [E, ...] over the file, or None
        one = expected[fused][1:]
        if view is not None and (view.shape[1:] == one or (fused in qnames and one == () and view.shape[1:] == (1,))):
            view = view.reshape(expected[fused])      # per-expert [1] scalars -> [E]
            for e, n in enumerate(names):
                _check(n, view[e], expected[fused][1:], qnames.get(fused), release=True)
            drop_pages(view)
            _assign(model, fused, view)
            continue
        out = torch.empty(expected[fused], dtype=held(fused), device=device)    # other writers' expert order
        for e, n in enumerate(names):
            t = src.get(n)
            if fused in qnames and one == () and t.shape == (1,):
                t = t.reshape(())
            mapped = src.mapped(t)
            _check(n, t, one, qnames.get(fused), release=mapped)
            out[e].copy_(t)
            if mapped:
                drop_pages(t)
        _assign(model, fused, out)
    if declares_fp8_kv(quant):
        for n in attention:
            mod = model.get_submodule(n)
            for which in ("k", "v"):
                value = 1.0
                if (n, which) in kv_names:
                    t = src.get(kv_names[(n, which)])
                    if t.numel() != 1 or not t.is_floating_point():
                        raise CheckpointError(f"{kv_names[(n, which)]}: an FP8 KV scale is one float, found "
                                              f"{t.dtype} {tuple(t.shape)}")
                    value = float(t.float())
                if not (math.isfinite(value) and value > 0):
                    raise CheckpointError(f"{n}.{which}_proj.{which}_scale = {value}: must be finite and > 0")
                setattr(mod, f"{which}_scale", value)
    if tied or (config.tie_word_embeddings and quant is None
                and torch.equal(model.lm_head.weight, model.backbone.embeddings.weight)):
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.eval()


def checkpoint_state(model: NemotronHForCausalLM, dtype=None, fused_experts: bool = False) -> dict:
    """The tensors to write, under checkpoint names (per-expert unless `fused_experts`)."""
    dtype = parse_dtype(dtype)
    from .quant.modelopt import kv_cache_scales
    from .quant.quantize import quant_state_names
    qnames = quant_state_names(model)          # packed codes, FP8 weights and scales keep their dtypes
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if name == "lm_head.weight" and model.lm_head.weight is model.backbone.embeddings.weight:
            # tied: written anyway (as its own copy: safetensors refuses shared storage), because
            # transformers' NemotronH never ties and would otherwise initialise lm_head at random;
            # `load` ties them again when the two stored tensors are equal
            t = t.clone()
        if dtype is not None and not name.endswith("e_score_correction_bias") and name not in qnames:
            t = t.to(dtype)
        m = _FUSED_EXPERT.match(name)
        if m and not fused_experts:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.{m.group(3) or 'weight'}"] = t[e].contiguous()
        else:
            out[name] = t.contiguous()
    for n, (ks, vs) in kv_cache_scales(model).items():
        out[f"{n}.k_proj.k_scale"] = torch.tensor(ks, dtype=torch.float32)
        out[f"{n}.v_proj.v_scale"] = torch.tensor(vs, dtype=torch.float32)
    return out


def save(model: NemotronHForCausalLM, path: str | os.PathLike, dtype=None,
         max_shard_bytes: int = 5 * 2**30, fused_experts: bool = False) -> None:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = checkpoint_state(model, dtype, fused_experts)
    config = model.config
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    config = config.replace(torch_dtype=dtype_name.get(parse_dtype(dtype) or model.dtype, "float32"),
                            extra={k: v for k, v in config.extra.items() if k != "quantization_config"})
    from .quant.modelopt import config_block, kv_cache_scales, write_hf_quant_config
    from .quant.quantize import quantized_module_formats
    if quantized_module_formats(model) or kv_cache_scales(model):   # ModelOpt layout: hf_quant_config.json + block
        if fused_experts:
            raise ValueError("quantized checkpoints are written per expert (ModelOpt layout); fused_experts=False")
        config.extra["quantization_config"] = config_block(write_hf_quant_config(model, path))
    elif (path / "hf_quant_config.json").exists():
        (path / "hf_quant_config.json").unlink()
    shards, current, size = [], {}, 0
    # one projection's experts never straddle two shards (they load as one view of one file)
    for _, group in itertools.groupby(sorted(state, key=expert_order), key=lambda n: expert_order(n)[0]):
        group = list(group)
        nbytes = sum(state[n].numel() * state[n].element_size() for n in group)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current.update({n: state[n] for n in group})
        size += nbytes
    shards.append(current)
    for old in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save(shards[0], path / "model.safetensors", meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, path / fname, meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = path / "model.safetensors.index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(path / "model.safetensors.index.json")
    config.save(path)


def expert_order(name: str) -> tuple:
    """Sort key of the written tensors: one projection's per-expert tensors back to back in expert order (so
    `load` maps them as one [E, ...] view), everything else by name."""
    m = _EXPERT.match(name)
    return (f"{m.group(1)}.{m.group(3)}.{m.group(4)}", int(m.group(2))) if m else (name, -1)


def _atomic_save(tensors: dict, target: Path, metadata: dict) -> None:
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata, order_key=expert_order)
    tmp.replace(target)


__all__ = ["load", "save", "CheckpointError", "ConfigError", "checkpoint_state", "canonical_name"]

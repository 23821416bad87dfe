"""Quantization recipes: ordered per-module rules (module name -> "nvfp4" | "fp8" | "bf16"), first match wins,
and an analytic bits-per-element report.

A recipe is data, a JSON file (the built-ins ``nvfp4`` and ``nvfp4-mixed`` are ``recipes/*.json`` next to this
module), because NVIDIA's own maps are not uniform per module kind (Super's MIXED_PRECISION checkpoint keeps Mamba
``in_proj`` FP8 in some layers and BF16 in others, two attention ``o_proj`` FP8, ...)::

    {"name": "my-recipe",                       optional; default: the file name without .json
     "description": "...",                      optional
     "default": "bf16",                         optional; the format of a linear no rule matches
     "rules": [                                 tried in order, the first matching rule decides
       {"modules": "backbone.layers.*.mixer.experts", "format": "nvfp4"},
       {"modules": ["backbone.layers.*.mixer.in_proj", "backbone.layers.*.mixer.out_proj"],
        "layers": [0, 2, 4], "format": "fp8"},
       {"regex": "backbone\\\\.layers\\\\.(1|3)\\\\.mixer\\\\.o_proj", "format": "fp8"}]}

A rule has ``modules`` (one glob or a list, ``fnmatch``: ``*`` also spans dots, as ModelOpt's and vLLM's
patterns) or ``regex`` (a full match), an optional ``layers`` (backbone layer indices, or
``"mamba_before_attention"``: the Mamba layer nearest before each attention layer, which Nano keeps in BF16; a rule
with ``layers`` never matches names outside ``backbone.layers``) and a ``format``. Names are the checkpoint's
module names (``backbone.layers.{i}.mixer.in_proj``, ``mtp.layers.{j}.mixer.q_proj``, ``lm_head``); the routed
experts of a layer are one module, ``backbone.layers.{i}.mixer.experts`` (its on-disk names
``...experts.{e}.up_proj`` match the same rules), NVFP4 or BF16. Only linears and routed experts follow a
recipe: embeddings, norms, Mamba ``conv1d``, A_log/D/dt_bias and the router (``mixer.gate``) stay BF16.
Reference: ``shared/reference/nvfp4.md`` §3.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable

import torch

from ..config import NemotronConfig

FORMATS = ("nvfp4", "fp8", "bf16")
# storage bits per weight element (§3.3): NVFP4 4-bit code + one E4M3 scale per 16; FP8 one byte; BF16 two
ELEMENT_BITS = {"nvfp4": 4 + 8 / 16, "fp8": 8.0, "bf16": 16.0}
# fp32 scalars per stored tensor: NVFP4 weight_scale_2 + input_scale, FP8 weight_scale + input_scale
TENSOR_BITS = {"nvfp4": 64, "fp8": 64, "bf16": 0}
BUILTIN_DIR = Path(__file__).parent / "recipes"
LAYER_SETS = ("mamba_before_attention",)

_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")
_RULE_KEYS = {"modules", "regex", "layers", "format"}
_RECIPE_KEYS = {"name", "description", "default", "rules"}


def mamba_before_attention(config: NemotronConfig) -> set[int]:
    """Indices of the Mamba layer nearest before each attention layer (Nano NVFP4 keeps these in BF16)."""
    out = set()
    for i, ch in enumerate(config.pattern):
        if ch == "*":
            j = config.pattern.rfind("M", 0, i)
            if j >= 0:
                out.add(j)
    return out


@dataclass(frozen=True)
class Rule:
    globs: tuple[str, ...]
    regex: re.Pattern | None
    layers: frozenset[int] | str | None
    format: str

    def matches(self, config: NemotronConfig, name: str) -> bool:
        if self.layers is not None:
            m = _LAYER.match(name)
            if m is None:
                return False
            chosen = mamba_before_attention(config) if self.layers == "mamba_before_attention" else self.layers
            if int(m.group(1)) not in chosen:
                return False
        if self.regex is not None:
            return self.regex.fullmatch(name) is not None
        return any(fnmatchcase(name, g) for g in self.globs)


@dataclass(frozen=True)
class Recipe:
    """An ordered rule list; ``recipe(config, module name) -> format`` (the callable form quantize_model takes)."""
    name: str
    rules: tuple[Rule, ...]
    default: str = "bf16"
    description: str = ""

    def __call__(self, config: NemotronConfig, name: str) -> str:
        for rule in self.rules:
            if rule.matches(config, name):
                return rule.format
        return self.default

    @classmethod
    def from_dict(cls, data, source: str = "recipe") -> "Recipe":
        """Validate and build; ValueError naming ``source`` and the offending rule on any bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a recipe is a JSON object with a 'rules' list, got {type(data).__name__}")
        unknown = set(data) - _RECIPE_KEYS
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_RECIPE_KEYS)})")
        default = data.get("default", "bf16")
        _check_format(default, f"{source}: default")
        rules = data.get("rules")
        if not isinstance(rules, list):
            raise ValueError(f"{source}: 'rules' must be a list of rule objects")
        return cls(str(data.get("name") or Path(source).stem), tuple(_rule(r, f"{source}: rule {k}")
                                                                     for k, r in enumerate(rules)),
                   default, str(data.get("description", "")))

    @classmethod
    def from_file(cls, path) -> "Recipe":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, str(path))


def _check_format(fmt, where: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {fmt!r} (formats: {', '.join(FORMATS)})")


def _rule(r, where: str) -> Rule:
    if not isinstance(r, dict):
        raise ValueError(f"{where}: a rule is an object with 'modules' or 'regex' and 'format'")
    unknown = set(r) - _RULE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_RULE_KEYS)})")
    if ("modules" in r) == ("regex" in r):
        raise ValueError(f"{where}: give exactly one of 'modules' (glob or list of globs) and 'regex'")
    _check_format(r.get("format"), where)
    globs = r.get("modules", ())
    globs = (globs,) if isinstance(globs, str) else globs
    if not isinstance(globs, (list, tuple)) or not all(isinstance(g, str) for g in globs):
        raise ValueError(f"{where}: 'modules' must be a glob string or a list of them")
    regex = None
    if "regex" in r:
        try:
            regex = re.compile(r["regex"])
        except (re.error, TypeError) as e:
            raise ValueError(f"{where}: bad regex {r['regex']!r} ({e})") from None
    layers = r.get("layers")
    if isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        layers = frozenset(layers)
    elif layers is not None and layers not in LAYER_SETS:
        raise ValueError(f"{where}: 'layers' must be a list of layer indices or one of {list(LAYER_SETS)}, "
                         f"got {layers!r}")
    return Rule(tuple(globs), regex, layers, r["format"])


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.json"))}


def get_recipe(recipe) -> Callable[[NemotronConfig, str], str]:
    """A Recipe from a built-in name or a recipe file path; a callable (config, name) -> format is kept as is."""
    if callable(recipe):
        return recipe
    builtins = builtin_recipes()
    if recipe in builtins:
        return Recipe.from_file(builtins[recipe])
    if isinstance(recipe, (str, Path)) and Path(recipe).is_file():
        return Recipe.from_file(recipe)
    raise ValueError(f"unknown quantization recipe {str(recipe)!r}: neither a built-in ({', '.join(builtins)}) "
                     "nor a recipe file")


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
    return {"recipe": getattr(fn, "name", None) or getattr(fn, "__name__", "custom"),
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

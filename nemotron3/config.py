"""The model configuration: Hugging Face `nemotron_h` config.json <-> one dataclass.

Field names are the Hugging Face ones, so `config.json` maps onto the dataclass without a renaming table.
The layer stack is held as a pattern string (`M` Mamba-2, `*` attention, `E` MoE, `-` dense MLP), the
form of `hybrid_override_pattern`; the reader also accepts the `layers_block_type` list in NVIDIA's words
(`mamba/attention/moe/mlp`) and in `transformers`' words (`linear_attention/full_attention/moe/mlp`), and
the `mamba_*` field aliases. Unknown keys are kept in `extra` and written back unchanged, so a config
round-trips through us without losing what we do not model (e.g. `quantization_config`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PATTERN_CHARS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
TORCH_DTYPES = ("float32", "bfloat16", "float16")     # config.json `torch_dtype` values we load
_WORD_TO_CHAR = {
    "mamba": "M", "linear_attention": "M",
    "attention": "*", "full_attention": "*",
    "moe": "E", "mlp": "-",
}
# Older spellings of Mamba fields accepted by transformers' NemotronHConfig.
_ALIASES = {
    "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max", "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor", "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size", "norm_eps": "layer_norm_epsilon", "num_local_experts": "n_routed_experts",
}
# Keys we derive or rewrite ourselves when writing config.json.
_DERIVED_KEYS = {"hybrid_override_pattern", "layers_block_type", "mtp_hybrid_override_pattern",
                 "mtp_layers_block_type", "num_hidden_layers", "model_type", "architectures"}


class ConfigError(ValueError):
    """A config.json that cannot describe a nemotron_h model; the message names the field."""


def parse_pattern(value: Any, field_name: str) -> str:
    """Turn a pattern string or a list of block-type words into the canonical `M*E-` string."""
    if isinstance(value, str):
        bad = sorted({c for c in value if c not in PATTERN_CHARS})
        if bad:
            raise ConfigError(f"{field_name}: unknown pattern character(s) {bad} in {value!r}; "
                              f"expected {''.join(PATTERN_CHARS)} (M=mamba, *=attention, E=moe, -=mlp)")
        return value
    if isinstance(value, (list, tuple)):
        out = []
        for i, word in enumerate(value):
            if not isinstance(word, str) or word not in _WORD_TO_CHAR:
                raise ConfigError(f"{field_name}[{i}]: unknown block type {word!r}; "
                                  f"expected one of {sorted(_WORD_TO_CHAR)}")
            out.append(_WORD_TO_CHAR[word])
        return "".join(out)
    raise ConfigError(f"{field_name}: expected a pattern string or a list of block types, got {type(value).__name__}")


def _json_float(v: Any) -> Any:
    """transformers writes infinity as {"__float__": "Infinity"}; accept that and plain strings."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    if isinstance(v, str):
        return float(v)
    return v


@dataclass
class NemotronConfig:
    """Hyper-parameters of a Nemotron-H / Nemotron 3 model (defaults: transformers' NemotronHConfig)."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    pattern: str = "M*E-"                      # hybrid_override_pattern / layers_block_type
    # attention (`*`)
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    # dense MLP (`-`) and experts: non-gated relu^2
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2 (`M`)
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    expand: int = 2
    chunk_size: int = 128
    mamba_hidden_act: str = "silu"
    use_conv_bias: bool = True
    use_bias: bool = False
    mamba_proj_bias: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # Opt-in `dt` lower clamp at time_step_min (NVIDIA's original remote code and transformers 4.x clamped in
    # their PyTorch paths). Off by default: transformers 5.x (the numerics reference), vLLM, TensorRT-LLM and
    # llama.cpp never clamp, so a checkpoint without this key runs as they run it. When on, it applies in every
    # path (prefill, chunked prefill, decode), so cached decode still equals the full forward. (Our own key;
    # transformers ignores it.)
    mamba_dt_clamp: bool = False
    # MoE (`E`): LatentMoE when moe_latent_size is set
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    n_shared_experts: int = 1
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # Multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_pattern: str = "*E"                    # mtp_hybrid_override_pattern / mtp_layers_block_type
    # norms, embeddings, init
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = 0
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict)  # unknown keys, written back verbatim

    def __post_init__(self):
        self.pattern = parse_pattern(self.pattern, "hybrid_override_pattern")
        self.mtp_pattern = parse_pattern(self.mtp_pattern, "mtp_hybrid_override_pattern")
        lim = self.time_step_limit
        if not isinstance(lim, (list, tuple)) or len(lim) != 2:
            raise ConfigError(f"time_step_limit: expected [min, max], got {lim!r}")
        try:
            self.time_step_limit = tuple(float(_json_float(v)) for v in lim)
        except (TypeError, ValueError):
            raise ConfigError(f"time_step_limit: expected two numbers [min, max], got {lim!r}") from None
        self.validate()

    # ---- derived sizes (reference: nemotron3-arch.md §1.3) ----
    @property
    def num_hidden_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def moe_input_size(self) -> int:
        """Width the routed experts compute in: the latent size in LatentMoE, else the model width."""
        return self.moe_latent_size or self.hidden_size

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(len(self.pattern) > 0, "hybrid_override_pattern: the layer pattern is empty")
        need(self.torch_dtype is None or self.torch_dtype in TORCH_DTYPES,
             f"torch_dtype: unknown dtype {self.torch_dtype!r}; expected one of {', '.join(TORCH_DTYPES)}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                     "chunk_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            v = getattr(self, name)
            need(is_int(v) and v > 0, f"{name}: expected a positive integer, got {v!r}")

        need(is_int(self.num_nextn_predict_layers) and self.num_nextn_predict_layers >= 0,
             f"num_nextn_predict_layers: expected an integer >= 0, got {self.num_nextn_predict_layers!r}")
        need(not self.has_mtp or len(self.mtp_pattern) > 0,
             "mtp_hybrid_override_pattern: the MTP layer pattern is empty but num_nextn_predict_layers > 0")
        kinds = set(self.pattern) | (set(self.mtp_pattern) if self.has_mtp else set())
        sizes = [("intermediate_size", "-"), ("moe_intermediate_size", "E"),
                 ("moe_shared_expert_intermediate_size", "E")]
        for name, kind in sizes:
            v = getattr(self, name)
            need(kind not in kinds or (is_int(v) and v > 0), f"{name}: expected a positive integer, got {v!r}")
        for name in ("attention_bias", "mlp_bias", "use_conv_bias", "use_bias", "mamba_proj_bias", "mamba_dt_clamp",
                     "norm_topk_prob", "tie_word_embeddings", "rescale_prenorm_residual", "residual_in_fp32"):
            v = getattr(self, name)
            need(isinstance(v, bool), f"{name}: expected true or false, got {v!r}")
        for name in ("layer_norm_epsilon", "time_step_min", "time_step_max", "time_step_floor",
                     "routed_scaling_factor", "initializer_range"):
            v = getattr(self, name)
            need(is_num(v), f"{name}: expected a finite number, got {v!r}")
        need(self.layer_norm_epsilon > 0, f"layer_norm_epsilon: expected a positive number, got {self.layer_norm_epsilon!r}")
        lo, hi = self.time_step_limit
        need(0 <= lo <= hi, f"time_step_limit: expected 0 <= min <= max, got {list(self.time_step_limit)}")
        if "*" in self.pattern or (self.has_mtp and "*" in self.mtp_pattern):
            need(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                 f"num_key_value_heads ({self.num_key_value_heads})")
        if "M" in self.pattern or (self.has_mtp and "M" in self.mtp_pattern):
            need(self.mamba_num_heads % self.n_groups == 0,
                 f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})")
        if "E" in self.pattern or (self.has_mtp and "E" in self.mtp_pattern):
            need(self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) > n_routed_experts ({self.n_routed_experts})")
            need(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group ({self.n_group})")
            need(self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) > n_group ({self.n_group})")
            if self.n_group > 1:
                need(self.n_routed_experts // self.n_group >= 2,
                     "n_group > 1 needs at least 2 experts per group (group score = sum of its top-2)")
                need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                     "num_experts_per_tok exceeds the experts left after group-limited routing")
        need(self.mlp_hidden_act == "relu2", f"mlp_hidden_act: only 'relu2' is supported, got {self.mlp_hidden_act!r}")
        need(self.mamba_hidden_act == "silu", f"mamba_hidden_act: only 'silu' is supported, got {self.mamba_hidden_act!r}")
        need(self.moe_latent_size is None or (isinstance(self.moe_latent_size, int) and self.moe_latent_size > 0),
             f"moe_latent_size: expected null or a positive integer, got {self.moe_latent_size!r}")
        need(self.mamba_ssm_cache_dtype in ("float32", "bfloat16", "float16"),
             f"mamba_ssm_cache_dtype: unsupported {self.mamba_ssm_cache_dtype!r}")

    # ---- config.json ----
    @classmethod
    def from_dict(cls, d: dict) -> "NemotronConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        d = dict(d)
        mt = d.get("model_type")
        if mt is not None and mt not in ("nemotron_h", "nemotron_h_mtp"):
            raise ConfigError(f"model_type: expected 'nemotron_h', got {mt!r}")
        for old, new in _ALIASES.items():
            if old in d:
                v = d.pop(old)
                d.setdefault(new, v)
        # Layer stack: the list form wins (as in transformers), else the pattern string.
        if d.get("layers_block_type") is not None:
            pattern = parse_pattern(d["layers_block_type"], "layers_block_type")
        elif d.get("hybrid_override_pattern") is not None:
            pattern = parse_pattern(d["hybrid_override_pattern"], "hybrid_override_pattern")
        else:
            raise ConfigError("config.json has neither `hybrid_override_pattern` nor `layers_block_type`")
        n = d.get("num_hidden_layers")
        if n is not None and n != len(pattern):
            raise ConfigError(f"num_hidden_layers ({n!r}) does not match the layer pattern length ({len(pattern)})")
        if d.get("mtp_layers_block_type") is not None:
            mtp = parse_pattern(d["mtp_layers_block_type"], "mtp_layers_block_type")
        elif d.get("mtp_hybrid_override_pattern") is not None:
            mtp = parse_pattern(d["mtp_hybrid_override_pattern"], "mtp_hybrid_override_pattern")
        else:
            mtp = "*E"
        if "dtype" in d and "torch_dtype" not in d:       # transformers 5 writes `dtype`
            d["torch_dtype"] = d.pop("dtype")
        names = {f.name for f in dataclasses.fields(cls)} - {"pattern", "mtp_pattern", "extra"}
        kwargs = {k: d[k] for k in names if k in d}
        extra = {k: v for k, v in d.items() if k not in names and k not in _DERIVED_KEYS}
        # Absent fields take transformers' defaults (dataclass defaults); explicit nulls as transformers
        # resolves them: num_key_value_heads -> num_attention_heads, head_dim -> hidden / heads.
        if "num_key_value_heads" in kwargs and kwargs["num_key_value_heads"] is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        if "head_dim" in kwargs and kwargs["head_dim"] is None:
            kwargs["head_dim"] = kwargs.get("hidden_size", cls.hidden_size) // kwargs.get(
                "num_attention_heads", cls.num_attention_heads)
        try:
            return cls(pattern=pattern, mtp_pattern=mtp, extra=extra, **kwargs)
        except TypeError as e:  # e.g. a list where an int belongs
            raise ConfigError(f"config.json: {e}") from None

    def to_dict(self) -> dict:
        """The config.json dict: both pattern forms are written so old and new readers agree."""
        d = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        for f in dataclasses.fields(self):
            if f.name in ("pattern", "mtp_pattern", "extra"):
                continue
            v = getattr(self, f.name)
            if f.name == "time_step_limit":
                v = list(v)
            if f.name == "torch_dtype" and v is None:
                continue
            d[f.name] = v
        d["num_hidden_layers"] = self.num_hidden_layers
        d["hybrid_override_pattern"] = self.pattern
        d["layers_block_type"] = [PATTERN_CHARS[c] for c in self.pattern]
        d["mtp_hybrid_override_pattern"] = self.mtp_pattern
        d["mtp_layers_block_type"] = [PATTERN_CHARS[c] for c in self.mtp_pattern]
        d.update(self.extra)
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> "NemotronConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "config.json.tmp"
        d = self.to_dict()
        # strict JSON has no Infinity: write it the way transformers does
        d["time_step_limit"] = [x if math.isfinite(x) else {"__float__": "Infinity"} for x in d["time_step_limit"]]
        tmp.write_text(json.dumps(d, indent=2) + "\n")
        tmp.replace(directory / "config.json")

    def replace(self, **changes) -> "NemotronConfig":
        return dataclasses.replace(self, **changes)

"""Named configs (tiny / nano / super / ultra) and analytic parameter and cache accounting.

Values: `/work/shared/reference/nemotron3-arch.md` §1 (configs, patterns), §2 (tensor shapes), §9 (counts).
Everything here is computed from a `NemotronConfig` alone, without building a model (Ultra is ~560B).
"""
from __future__ import annotations

import copy
import math

from .config import NemotronConfig

# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------

_NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
_SUPER_PATTERN = ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME")
_ULTRA_PATTERN = ("MEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*"
                  "EMEMEMEM*EMEMEMEME")

# Fields shared by the three released models (config.json values, §1.1). The `rope_*` keys are dead
# leftovers (NoPE, §5); they and `sliding_window` are kept in `extra` only so `to_dict()` reproduces the
# released config.json.
_RELEASED = dict(
    vocab_size=131072, max_position_embeddings=262144, num_key_value_heads=2, head_dim=128,
    attention_bias=False, mlp_hidden_act="relu2", mlp_bias=False,
    mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, expand=2, chunk_size=128,
    mamba_hidden_act="silu", use_conv_bias=True, use_bias=False, mamba_proj_bias=False,
    time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4, time_step_limit=(0.0, math.inf),
    mamba_ssm_cache_dtype="float32", n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
    layer_norm_epsilon=1e-5, tie_word_embeddings=False, initializer_range=0.02,
    rescale_prenorm_residual=True, residual_in_fp32=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16",
)
_DEAD = {"rope_theta": 10000, "partial_rotary_factor": 1.0, "sliding_window": None}

PRESETS: dict[str, NemotronConfig] = {
    # CPU test model with every block kind (M, *, E with LatentMoE + shared expert, dense -) and MTP `*E`.
    # Widths are all different (d 64, latent 32, expert 48, shared 96, dense 128) to catch transposed shapes.
    "tiny": NemotronConfig(
        vocab_size=512, hidden_size=64, pattern="M*EM-E", max_position_embeddings=4096,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
        intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
        n_shared_experts=1, moe_shared_expert_intermediate_size=96, moe_latent_size=32,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, mtp_pattern="*E",
    ),
    # NVIDIA-Nemotron-3-Nano-30B-A3B: 52 layers (23 M / 23 E / 6 *), no latent, no MTP.
    "nano": NemotronConfig(
        **_RELEASED, hidden_size=2688, pattern=_NANO_PATTERN, num_attention_heads=32, mamba_num_heads=64,
        intermediate_size=1856, n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, moe_latent_size=None, routed_scaling_factor=2.5,
        num_nextn_predict_layers=0, mtp_pattern="*E", extra=dict(_DEAD),
    ),
    # NVIDIA-Nemotron-3-Super-120B-A12B: 88 layers (40 M / 40 E / 8 *), latent 1024, MTP `*E`.
    "super": NemotronConfig(
        **_RELEASED, hidden_size=4096, pattern=_SUPER_PATTERN, num_attention_heads=32, mamba_num_heads=128,
        intermediate_size=2688, n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
        moe_shared_expert_intermediate_size=5376, moe_latent_size=1024, routed_scaling_factor=5.0,
        num_nextn_predict_layers=1, mtp_pattern="*E", extra={**_DEAD, "moe_shared_expert_overlap": False},
    ),
    # NVIDIA-Nemotron-3-Ultra-550B-A55B: 108 layers (48 M / 48 E / 12 *), latent 2048, MTP `*E`.
    "ultra": NemotronConfig(
        **_RELEASED, hidden_size=8192, pattern=_ULTRA_PATTERN, num_attention_heads=64, mamba_num_heads=256,
        intermediate_size=5120, n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=5120,
        moe_shared_expert_intermediate_size=10240, moe_latent_size=2048, routed_scaling_factor=5.0,
        num_nextn_predict_layers=1, mtp_pattern="*E", extra={**_DEAD, "moe_shared_expert_overlap": False},
    ),
}

# Fields whose preset value is NOT confirmed by a primary source (reference §1.1 sources, §9, §11).
# nano / super: every value comes from a third-party verbatim transcription of the released config.json
#   [S]; listed are the fields NVIDIA's own Megatron arg lists (MLM) do not corroborate.
# ultra: dimensions, pattern, heads, experts, latent, routed_scaling_factor 5.0, relu2, NoPE, untied and
#   MTP `*E` are confirmed (MLM + tech-report Table 1); the rest is third-party [S] or assumed equal to
#   Nano/Super [I]: the token ids (Ultra's eos / generation_config were never seen), n_group/topk_group/
#   norm_topk_prob (implied by MLM setting no router groups), torch_dtype, initializer_range.
# tiny is ours (no source).
_SECONDARY = ["vocab_size", "max_position_embeddings", "conv_kernel", "expand", "chunk_size", "use_conv_bias",
              "mamba_proj_bias", "time_step_min", "time_step_max", "time_step_floor", "time_step_limit",
              "mamba_ssm_cache_dtype", "n_group", "topk_group", "norm_topk_prob", "layer_norm_epsilon",
              "residual_in_fp32", "rescale_prenorm_residual", "initializer_range"]
INFERRED: dict[str, list[str]] = {
    "tiny": [],
    "nano": _SECONDARY + ["routed_scaling_factor", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype"],
    "super": _SECONDARY + ["routed_scaling_factor", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
                           "num_nextn_predict_layers"],
    "ultra": _SECONDARY + ["bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "num_nextn_predict_layers",
                           "use_bias", "mamba_hidden_act", "intermediate_size"],
}


def get_preset(name: str) -> NemotronConfig:
    """A fresh (deep) copy of a named preset; ValueError listing the names for an unknown one."""
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])


# ---------------------------------------------------------------------------------------------------------
# Parameter accounting (shapes: reference §2; conventions match transformers' NemotronH modules)
# ---------------------------------------------------------------------------------------------------------

KINDS = ("mamba", "attention", "dense_mlp", "routed_experts", "shared_experts", "latent_projections",
         "routers", "norms", "embeddings", "lm_head", "mtp")


def _mixer(cfg: NemotronConfig, ch: str) -> tuple[dict, int, int]:
    """Params of one block (its pre-norm included) by kind, the routed params of ONE expert, and the
    router-bias buffer size. Mirrors: M (mamba_num_heads, mamba_head_dim, n_groups, ssm_state_size,
    conv_kernel, use_bias on in/out_proj, use_conv_bias), * (num_attention_heads, num_key_value_heads,
    head_dim; no bias, as in every implementation), E (n_routed_experts, moe_intermediate_size,
    moe_latent_size, moe_shared_expert_intermediate_size, mlp_bias on shared/latent linears; experts have no
    bias; n_shared_experts is not a multiplier, as in transformers), - (intermediate_size, mlp_bias)."""
    d = cfg.hidden_size
    out = {"norms": d}
    expert, buf = 0, 0
    if ch == "M":
        H, di, cd, K = cfg.mamba_num_heads, cfg.mamba_d_inner, cfg.mamba_conv_dim, cfg.conv_kernel
        in_out = di + cd + H
        out["mamba"] = (in_out * d + (in_out if cfg.use_bias else 0)       # in_proj [z|xBC|dt]
                        + cd * K + (cd if cfg.use_conv_bias else 0)          # conv1d [conv_dim, 1, K]
                        + 3 * H + di                                         # dt_bias, A_log, D; gated norm
                        + d * di + (d if cfg.use_bias else 0))               # out_proj (+bias: HF)
    elif ch == "*":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        out["attention"] = 2 * q * d + 2 * kv * d
    elif ch == "-":
        I, b = cfg.intermediate_size, cfg.mlp_bias
        out["dense_mlp"] = 2 * I * d + (I + d if b else 0)
    elif ch == "E":
        E, I, l, S, b = (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_input_size,
                         cfg.moe_shared_expert_intermediate_size, cfg.mlp_bias)
        expert = 2 * I * l
        out["routers"] = E * d
        out["routed_experts"] = E * expert
        out["shared_experts"] = 2 * S * d + (S + d if b else 0)
        if cfg.moe_latent_size:
            out["latent_projections"] = 2 * l * d + (l + d if b else 0)
        buf = E
    else:
        raise ValueError(f"unknown pattern character {ch!r}")
    return out, expert, buf


def _stack(cfg: NemotronConfig, pattern: str) -> tuple[dict, dict, int]:
    """Total and active params by kind over a layer pattern, plus router-bias buffer elements."""
    tot, act, buf = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0), 0
    for ch in pattern:
        part, expert, b = _mixer(cfg, ch)
        buf += b
        for k, v in part.items():
            tot[k] += v
            act[k] += cfg.num_experts_per_tok * expert if k == "routed_experts" else v
    return tot, act, buf


def count_parameters(cfg: NemotronConfig) -> dict:
    """Analytic parameter counts (no model built).

    - `backbone_params`: the trunk as transformers' NemotronHForCausalLM holds it (embeddings, layers, norm_f,
      lm_head unless tie_word_embeddings); `mtp_params`: num_nextn_predict_layers physical MTP steps (enorm,
      hnorm [d], eh_proj [d, 2d], a pre-norm + mixer per mtp_pattern char, final_layernorm [d]; embeddings
      and lm_head are shared, not repeated); `total_params` = backbone + MTP, `total_params_excl_mtp`.
    - `active_params`: per token of the trunk forward: everything counts fully except routed experts, which
      count num_experts_per_tok of n_routed_experts. It INCLUDES the input embedding (the "3.6B incl.
      embeddings" convention of the Nano card); `active_params_excl_embedding` drops the input embedding
      (a lookup, no FLOPs) but keeps lm_head (with tied embeddings the matrix stays: it is the lm_head).
      MTP is not in `active_params` (it only runs when drafting); its per-token share is `mtp_active_params`.
    - `breakdown` / `active_breakdown`: by kind (KINDS); `mamba` includes the gated norm, `norms` are the
      block pre-norms + norm_f, `mtp` is the whole MTP (split by kind in `mtp_breakdown`, where eh_proj is
      `mtp_projections` and enorm/hnorm/final_layernorm are `norms`).
    - `buffers`: fp32 `e_score_correction_bias` elements (not parameters), trunk and MTP.
    """
    d, V = cfg.hidden_size, cfg.vocab_size
    tot, act, buf = _stack(cfg, cfg.pattern)
    tot["norms"] += d                                             # norm_f
    act["norms"] += d
    tot["embeddings"] = act["embeddings"] = V * d
    tot["lm_head"] = act["lm_head"] = 0 if cfg.tie_word_embeddings else V * d
    backbone, active = sum(tot.values()), sum(act.values())

    n_mtp = cfg.num_nextn_predict_layers
    mtot, mact, mbuf = _stack(cfg, cfg.mtp_pattern) if n_mtp else (dict.fromkeys(KINDS, 0),) * 2 + (0,)
    mtp_breakdown = {k: v * n_mtp for k, v in mtot.items() if v and k != "mtp"}
    mtp_breakdown["mtp_projections"] = 2 * d * d * n_mtp          # eh_proj
    mtp_breakdown["norms"] = mtp_breakdown.get("norms", 0) + 3 * d * n_mtp   # enorm, hnorm, final_layernorm
    mtp_params = sum(mtp_breakdown.values()) if n_mtp else 0
    mtp_active = (sum(mact.values()) + 2 * d * d + 3 * d) * n_mtp
    tot["mtp"], act["mtp"] = mtp_params, mtp_active
    total = backbone + mtp_params
    return {
        "total_params": total,
        "total_params_excl_mtp": backbone,
        "backbone_params": backbone,
        "mtp_params": mtp_params,
        "active_params": active,
        "active_params_excl_embedding": active - (0 if cfg.tie_word_embeddings else V * d),
        "mtp_active_params": mtp_active,
        "breakdown": tot,
        "active_breakdown": act,
        "mtp_breakdown": mtp_breakdown if n_mtp else {},
        "buffers": {"e_score_correction_bias": buf, "mtp_e_score_correction_bias": mbuf * n_mtp},
        "layer_counts": {c: cfg.pattern.count(c) for c in "M*E-"},
        "bytes_bf16": 2 * total,
    }


# ---------------------------------------------------------------------------------------------------------
# Inference cache accounting (reference §4 decode state, §5 KV cache)
# ---------------------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def cache_bytes(cfg: NemotronConfig, context_len: int, batch: int = 1, kv_dtype_bytes: int = 2,
                conv_dtype_bytes: int = 2) -> dict:
    """Inference cache bytes for `batch` sequences of `context_len` tokens (all values for the whole batch).

    Per Mamba layer (trunk `M` + MTP `M`): SSM state [mamba_num_heads, mamba_head_dim, ssm_state_size] in
    mamba_ssm_cache_dtype, conv state [mamba_conv_dim, conv_kernel - 1] (the kernels' K-1 window) in
    conv_dtype_bytes; both independent of context. Per attention layer (trunk `*` + the MTP `*` layers when
    num_nextn_predict_layers > 0, which have their own slot): K and V [num_key_value_heads, head_dim] per token.
    `pure_attention_*`: the same model with every trunk layer an attention layer (same heads; MTP as is).
    """
    n_mtp = cfg.num_nextn_predict_layers
    n_m = cfg.pattern.count("M") + n_mtp * cfg.mtp_pattern.count("M")
    n_att = cfg.pattern.count("*") + n_mtp * cfg.mtp_pattern.count("*")
    kv_tok_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * kv_dtype_bytes
    ssm = n_m * cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * _DTYPE_BYTES[cfg.mamba_ssm_cache_dtype]
    conv = n_m * cfg.mamba_conv_dim * (cfg.conv_kernel - 1) * conv_dtype_bytes
    kv = n_att * kv_tok_layer * context_len
    total = ssm + conv + kv
    n_pure = cfg.num_hidden_layers + n_mtp * cfg.mtp_pattern.count("*")
    pure = n_pure * kv_tok_layer * context_len
    return {
        "context_len": context_len, "batch": batch,
        "mamba_layers": n_m, "attention_layers": n_att,
        "ssm_state_bytes": batch * ssm, "conv_state_bytes": batch * conv, "kv_bytes": batch * kv,
        "kv_bytes_per_token": n_att * kv_tok_layer,
        "total_bytes": batch * total, "per_sequence_bytes": total,
        "pure_attention_layers": n_pure, "pure_attention_kv_bytes": batch * pure,
        "pure_attention_over_hybrid": pure / total if total else math.inf,
    }


# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------

def report_dict(cfg: NemotronConfig, context_len: int | None = None, cfg_name: str | None = None) -> dict:
    """Everything `format_report` shows, JSON-serialisable (`nemotron3 info --json`)."""
    ctx = context_len or cfg.max_position_embeddings
    params = count_parameters(cfg)
    return {"total_params": params["total_params"], "active_params": params["active_params"],
            "inferred_fields": INFERRED.get(cfg_name, []) if cfg_name else [],
            "config": {"pattern": cfg.pattern, "num_hidden_layers": cfg.num_hidden_layers,
                       "hidden_size": cfg.hidden_size, "n_routed_experts": cfg.n_routed_experts,
                       "num_experts_per_tok": cfg.num_experts_per_tok, "moe_latent_size": cfg.moe_latent_size,
                       "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
                       "mtp_pattern": cfg.mtp_pattern if cfg.has_mtp else None},
            "params": params, "cache": cache_bytes(cfg, ctx)}


def _n(x: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3f} {unit}"
    return f"{x:.0f}"


def _b(x: float) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def format_report(cfg: NemotronConfig, name: str = "model", context_len: int | None = None,
                  preset: str | None = None) -> str:
    """A readable text table: params by kind (active vs total), bf16 size, cache bytes at a context; with
    `preset`, that preset's fields inferred without a primary source."""
    r = report_dict(cfg, context_len)
    p, c = r["params"], r["cache"]
    lc = p["layer_counts"]
    lines = [f"{name}: {cfg.num_hidden_layers} layers ({lc['M']} M / {lc['E']} E / {lc['*']} * / {lc['-']} -), "
             f"d={cfg.hidden_size}, experts {cfg.n_routed_experts} top-{cfg.num_experts_per_tok}, "
             f"latent {cfg.moe_latent_size or '-'}, MTP {cfg.num_nextn_predict_layers} x "
             f"{cfg.mtp_pattern if cfg.has_mtp else '-'}",
             f"  {'kind':<20}{'active':>14}{'total':>14}{'total (exact)':>20}"]
    for k in KINDS:
        if p["breakdown"][k]:
            lines.append(f"  {k:<20}{_n(p['active_breakdown'][k]):>14}{_n(p['breakdown'][k]):>14}"
                         f"{p['breakdown'][k]:>20,}")
    lines.append("  " + "-" * 68)
    for label, a, t in (("backbone (no MTP)", p["active_params"], p["backbone_params"]),
                        ("total (with MTP)", p["active_params"] + p["mtp_active_params"], p["total_params"])):
        lines.append(f"  {label:<20}{_n(a):>14}{_n(t):>14}{t:>20,}")
    a = p["active_params_excl_embedding"]
    lines.append(f"  active per token excl. input embedding (no MTP): {_n(a)} ({a:,})")
    lines.append(f"  bf16 weights: {p['bytes_bf16'] / 1e9:.1f} GB ({_b(p['bytes_bf16'])}); router bias buffers "
                 f"{p['buffers']['e_score_correction_bias'] + p['buffers']['mtp_e_score_correction_bias']:,} fp32")
    lines.append(f"  cache per sequence at context {c['context_len']:,} (KV {c['attention_layers']} layers bf16, "
                 f"SSM {cfg.mamba_ssm_cache_dtype}, conv bf16):")
    lines.append(f"    ssm state {_b(c['ssm_state_bytes'])} + conv state {_b(c['conv_state_bytes'])} + "
                 f"KV {_b(c['kv_bytes'])} ({_b(c['kv_bytes_per_token'])}/token) = {_b(c['total_bytes'])}")
    lines.append(f"    pure-attention equivalent ({c['pure_attention_layers']} attention layers): "
                 f"KV {_b(c['pure_attention_kv_bytes'])} = {c['pure_attention_over_hybrid']:.1f}x the hybrid")
    if INFERRED.get(preset):
        lines.append(f"  inferred (no primary source seen): {', '.join(INFERRED[preset])}")
    return "\n".join(lines)

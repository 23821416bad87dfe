"""Presets and analytic parameter / cache accounting, checked against transformers' NemotronH on meta."""
import functools
import math
import random

import pytest

from nemotron3.config import NemotronConfig
from nemotron3.presets import (INFERRED, KINDS, PRESETS, cache_bytes, count_parameters, format_report,
                               get_preset, report_dict)

# Reference §9 (transformers meta-device counts).
TRUNK = {"nano": 31_577_937_344, "super": 120_668_687_360, "ultra": 549_308_968_960}
MTP = {"super": 2_942_324_736, "ultra": 11_215_609_856}
NANO_MTP_STEP, NANO_PLUS_MTP = 1_335_325_824, 32_913_263_168
ACTIVE = {"nano": (3.580, 3.228), "super": (12.770, 12.233), "ultra": (56.059, 54.985)}  # incl / excl input emb


def _hf_config(cfg: NemotronConfig):
    transformers = pytest.importorskip("transformers")
    # to_dict() is the config.json form (inf as {"__float__": "Infinity"}); decode it as transformers'
    # own json reader does before passing the dict as keyword arguments (see test_to_dict_kwargs_direct).
    return transformers.NemotronHConfig(**cfg.to_dict())


def _hf_model(cfg: NemotronConfig):
    import torch
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        return transformers.NemotronHForCausalLM(_hf_config(cfg))


@functools.lru_cache(maxsize=None)
def _hf_preset_stats(name: str) -> tuple[int, dict, int]:
    return _hf_stats(get_preset(name))


def _hf_stats(cfg: NemotronConfig) -> tuple[int, dict, int]:
    """HF total params, params by our kinds (classified by name and layer char), router-bias buffer size."""
    m = _hf_model(cfg)
    kinds = dict.fromkeys(KINDS, 0)
    for name, p in m.named_parameters():
        parts = name.split(".")
        if name.startswith("lm_head"):
            k = "lm_head"
        elif parts[1] == "embeddings":
            k = "embeddings"
        elif parts[1] == "norm_f" or parts[3] == "norm":
            k = "norms"
        else:
            ch, sub = cfg.pattern[int(parts[2])], parts[4]
            k = {"M": "mamba", "*": "attention", "-": "dense_mlp"}.get(ch) or {
                "experts": "routed_experts", "shared_experts": "shared_experts", "gate": "routers",
                "fc1_latent_proj": "latent_projections", "fc2_latent_proj": "latent_projections"}[sub]
        kinds[k] += p.numel()
    buf = sum(b.numel() for n, b in m.named_buffers() if n.endswith("e_score_correction_bias"))
    return sum(p.numel() for p in m.parameters()), kinds, buf


def _random_configs(n=8, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pattern = "".join(rng.choice("M*E-") for _ in range(rng.randint(3, 9)))
        if i < 4:  # make sure every kind shows up in several configs
            pattern += "M*E-"[i] + "E"
        n_group = rng.choice([1, 2, 4])
        E = n_group * rng.choice([2, 3, 4])
        topk_group = rng.randint(1, n_group)
        heads_kv = rng.choice([1, 2])
        mh = rng.choice([2, 4, 8])
        out.append(NemotronConfig(
            vocab_size=rng.choice([97, 256, 1000]), hidden_size=rng.choice([24, 32, 48]), pattern=pattern,
            num_attention_heads=heads_kv * rng.choice([1, 2, 3]), num_key_value_heads=heads_kv,
            head_dim=rng.choice([8, 12, 16]), mamba_num_heads=mh, mamba_head_dim=rng.choice([4, 8]),
            ssm_state_size=rng.choice([4, 8, 16]), n_groups=rng.choice([g for g in (1, 2, 4) if mh % g == 0]),
            conv_kernel=rng.choice([2, 3, 4]), chunk_size=8, intermediate_size=rng.choice([16, 40]),
            n_routed_experts=E, num_experts_per_tok=rng.randint(1, min(E, topk_group * (E // n_group))),
            n_group=n_group, topk_group=topk_group, moe_intermediate_size=rng.choice([8, 20]),
            moe_shared_expert_intermediate_size=rng.choice([12, 28]),
            moe_latent_size=rng.choice([None, 8, 16]),
            use_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5, use_conv_bias=rng.random() < 0.5,
            num_nextn_predict_layers=rng.choice([0, 1, 2]), mtp_pattern=rng.choice(["*E", "M-", "E", "*"]),
        ))
    return out


RANDOM = _random_configs()


# ---- presets ------------------------------------------------------------------------------------------

def test_preset_values():
    assert set(PRESETS) == {"tiny", "nano", "super", "ultra"} and set(INFERRED) == set(PRESETS)
    n, s, u, t = (get_preset(x) for x in ("nano", "super", "ultra", "tiny"))
    fields = {f for c in (n, s, u) for f in c.to_dict()}
    assert all(set(v) <= fields for v in INFERRED.values())
    for c, layers, counts in ((n, 52, (23, 23, 6)), (s, 88, (40, 40, 8)), (u, 108, (48, 48, 12))):
        assert c.num_hidden_layers == layers
        assert (c.pattern.count("M"), c.pattern.count("E"), c.pattern.count("*"), c.pattern.count("-")) == counts + (0,)
        assert (c.vocab_size, c.max_position_embeddings, c.eos_token_id, c.bos_token_id, c.pad_token_id) == \
            (131072, 262144, 2, 1, 0)
        assert c.time_step_limit == (0.0, math.inf) and (c.n_group, c.topk_group, c.norm_topk_prob) == (1, 1, True)
        assert not c.tie_word_embeddings and c.mamba_ssm_cache_dtype == "float32"
    assert [i for i, ch in enumerate(n.pattern) if ch == "*"] == [5, 12, 19, 26, 33, 42]
    assert [i for i, ch in enumerate(s.pattern) if ch == "*"] == [7, 16, 25, 36, 47, 58, 69, 78]
    assert [i for i, ch in enumerate(u.pattern) if ch == "*"] == [7, 14, 23, 32, 39, 48, 57, 64, 73, 82, 89, 98]
    assert (n.mamba_d_inner, n.mamba_conv_dim, s.mamba_conv_dim, u.mamba_conv_dim) == (4096, 6144, 10240, 18432)
    assert (n.num_nextn_predict_layers, s.num_nextn_predict_layers, u.num_nextn_predict_layers) == (0, 1, 1)
    assert s.mtp_pattern == u.mtp_pattern == "*E"
    assert [c.routed_scaling_factor for c in (n, s, u)] == [2.5, 5.0, 5.0]
    assert (n.moe_latent_size, s.moe_latent_size, u.moe_latent_size) == (None, 1024, 2048)
    assert set(t.pattern) == set("M*E-") and t.has_mtp and t.moe_latent_size and t.vocab_size == 512


def test_get_preset_copies_and_errors():
    a = get_preset("tiny")
    a.hidden_size = 1
    a.extra["x"] = 1
    assert get_preset("tiny").hidden_size == 64 and "x" not in get_preset("tiny").extra
    assert get_preset("Ultra ") == PRESETS["ultra"]
    with pytest.raises(ValueError, match="tiny, nano, super, ultra"):
        get_preset("mega")


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_json_roundtrip_and_hf_load(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = get_preset(name)
    assert NemotronConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path)                                        # the real path: config.json on disk
    for h in (transformers.NemotronHConfig.from_pretrained(tmp_path), _hf_config(cfg)):
        assert h.hybrid_override_pattern == cfg.pattern and h.num_hidden_layers == cfg.num_hidden_layers
        assert h.mtp_hybrid_override_pattern == cfg.mtp_pattern
        assert h.num_nextn_predict_layers == cfg.num_nextn_predict_layers
        assert list(h.time_step_limit) == list(cfg.time_step_limit)
        for f in ("hidden_size", "n_routed_experts", "num_experts_per_tok", "moe_latent_size", "n_groups",
                  "mamba_num_heads", "routed_scaling_factor", "eos_token_id"):
            assert getattr(h, f) == getattr(cfg, f), f


def test_to_dict_kwargs_direct():
    transformers = pytest.importorskip("transformers")
    transformers.NemotronHConfig(**get_preset("nano").to_dict())


# ---- parameter counts vs transformers ------------------------------------------------------------------

def _check_against_hf(cfg, hf_total, hf_kinds, hf_buf):
    p = count_parameters(cfg)
    assert p["backbone_params"] == hf_total
    assert {k: v for k, v in p["breakdown"].items() if k != "mtp"} == {k: v for k, v in hf_kinds.items() if k != "mtp"}
    assert p["buffers"]["e_score_correction_bias"] == hf_buf
    assert p["total_params"] == hf_total + p["mtp_params"] and p["bytes_bf16"] == 2 * p["total_params"]
    # active = everything, routed experts scaled by top-k / E
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    assert p["active_params"] * E == (hf_total - hf_kinds["routed_experts"]) * E + hf_kinds["routed_experts"] * k
    assert p["active_params_excl_embedding"] == p["active_params"] - hf_kinds["embeddings"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_trunk_matches_hf(name):
    _check_against_hf(get_preset(name), *_hf_preset_stats(name))


@pytest.mark.parametrize("idx", range(len(RANDOM)))
def test_random_configs_match_hf(idx):
    cfg = RANDOM[idx]
    _check_against_hf(cfg, *_hf_stats(cfg))
    _check_mtp_via_hf(cfg)


def _check_mtp_via_hf(cfg):
    """MTP step = the mtp_pattern blocks (measured as an HF model of that pattern minus embeddings, lm_head,
    norm_f) + eh_proj [d, 2d] + enorm, hnorm, final_layernorm."""
    p = count_parameters(cfg)
    if not cfg.has_mtp:
        assert p["mtp_params"] == 0 and p["breakdown"]["mtp"] == 0
        return
    d, V = cfg.hidden_size, cfg.vocab_size
    blocks = _hf_stats(cfg.replace(pattern=cfg.mtp_pattern, num_nextn_predict_layers=0))[0] - 2 * V * d - d
    assert p["mtp_params"] == cfg.num_nextn_predict_layers * (blocks + 2 * d * d + 3 * d)
    assert sum(p["mtp_breakdown"].values()) == p["mtp_params"]


def test_tiny_mtp_via_hf():
    _check_mtp_via_hf(get_preset("tiny"))


def test_tied_embeddings():
    cfg = get_preset("tiny").replace(tie_word_embeddings=True)
    p, q = count_parameters(cfg), count_parameters(get_preset("tiny"))
    assert p["breakdown"]["lm_head"] == 0 and p["backbone_params"] == q["backbone_params"] - 512 * 64
    assert p["active_params_excl_embedding"] == p["active_params"]      # the matrix is still the lm_head


# ---- reference §9 numbers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nano", "super", "ultra"])
def test_reference_counts(name):
    p = count_parameters(get_preset(name))
    assert p["backbone_params"] == p["total_params_excl_mtp"] == TRUNK[name]
    assert p["mtp_params"] == MTP.get(name, 0) == p["breakdown"]["mtp"]
    assert p["total_params"] == TRUNK[name] + MTP.get(name, 0)
    inc, exc = ACTIVE[name]
    assert round(p["active_params"] / 1e9, 3) == inc and round(p["active_params_excl_embedding"] / 1e9, 3) == exc


def test_nano_with_mtp_matches_lightning_count():
    p = count_parameters(get_preset("nano").replace(num_nextn_predict_layers=1))
    assert p["mtp_params"] == NANO_MTP_STEP and p["total_params"] == NANO_PLUS_MTP


def test_ultra_headline():
    p = count_parameters(get_preset("ultra"))
    assert 540e9 < p["backbone_params"] < 560e9 and 545e9 < p["total_params"] < 565e9
    assert 53e9 < p["active_params_excl_embedding"] < 57e9 and 53e9 < p["active_params"] < 57e9
    assert p["breakdown"]["routed_experts"] / p["backbone_params"] > 0.9
    assert abs(p["bytes_bf16"] / 1e9 - 1121) < 1                       # "BF16 repo size ~1121 GB" (§9)


# ---- caches ---------------------------------------------------------------------------------------------

def test_cache_bytes_reference_numbers():
    nano = cache_bytes(get_preset("nano"), 1000)
    assert nano["kv_bytes_per_token"] == 6 * 1024 and nano["ssm_state_bytes"] == 46 * 2**20
    sup = cache_bytes(get_preset("super").replace(num_nextn_predict_layers=0), 10)
    assert sup["kv_bytes_per_token"] == 8 * 1024 and sup["ssm_state_bytes"] == 160 * 2**20
    u = get_preset("ultra")
    trunk = cache_bytes(u.replace(num_nextn_predict_layers=0), 1)
    assert trunk["kv_bytes_per_token"] == 12 * 1024 and trunk["ssm_state_bytes"] == 384 * 2**20
    assert trunk["conv_state_bytes"] == 48 * 18432 * 3 * 2
    c = cache_bytes(u, 1_000_000, batch=3)
    assert c["attention_layers"] == 13 and c["kv_bytes"] == 3 * 13 * 1024 * 1_000_000
    assert c["total_bytes"] == 3 * c["per_sequence_bytes"]
    assert c["total_bytes"] == c["ssm_state_bytes"] + c["conv_state_bytes"] + c["kv_bytes"]
    assert c["pure_attention_kv_bytes"] > 5 * c["total_bytes"]


def test_reports():
    import json
    for name in PRESETS:
        cfg = get_preset(name)
        text = format_report(cfg, name, context_len=1_000_000)
        assert name in text and "routed_experts" in text and "pure-attention" in text
        r = report_dict(cfg)
        json.dumps(r)
        assert r["cache"]["context_len"] == cfg.max_position_embeddings
    assert "549,308,968,960" in format_report(get_preset("ultra"), "ultra")


def test_info_on_a_directory_named_like_a_preset(tmp_path, capsys, monkeypatch):
    """`nemotron3 info nano` where ./nano is a model directory reports that directory's config, not the
    preset's (nor the preset's inferred fields); the same for any path ending in a preset's name."""
    import json
    from nemotron3.cli import main as cli_main
    d = tmp_path / "nano"
    d.mkdir()
    cfg = get_preset("tiny")
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    monkeypatch.chdir(tmp_path)
    for target in ("nano", str(d)):
        cli_main(["info", target])
        text = capsys.readouterr().out
        assert text.startswith(f"nano: {cfg.num_hidden_layers} layers") and "inferred" not in text, text
        cli_main(["info", target, "--json"])
        r = json.loads(capsys.readouterr().out)
        assert r["inferred_fields"] == [] and r["config"]["hidden_size"] == cfg.hidden_size
    monkeypatch.chdir(tmp_path.parent)
    cli_main(["info", "nano"])                                  # no such directory here: the preset
    assert "inferred" in capsys.readouterr().out

"""Checkpoint directories: round trips through both libraries, layouts, laziness and clear errors."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import nemotron3
from nemotron3 import checkpoint
from helpers import hf_model_from, randomize, small_config, to_hf_state
from nemotron3 import CheckpointError, ConfigError, NemotronConfig, NemotronHForCausalLM

transformers = pytest.importorskip("transformers")


def make(mtp=True, **kw):
    torch.manual_seed(0)
    cfg = small_config("ME*-E", moe_latent_size=16, num_nextn_predict_layers=int(mtp), **kw)
    return randomize(NemotronHForCausalLM(cfg).eval())


def ids_for(model, T=11):
    return torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(5))


def test_save_load_roundtrip_is_exact_including_mtp(tmp_path):
    model = make()
    nemotron3.save(model, tmp_path)
    files = load_file(tmp_path / "model.safetensors")
    assert "mtp.layers.0.eh_proj.weight" in files and "mtp.layers.1.final_layernorm.weight" in files
    assert "backbone.layers.1.mixer.experts.5.up_proj.weight" in files          # per-expert on disk
    again = nemotron3.load(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    nemotron3.save(again, tmp_path / "second")
    files2 = load_file(tmp_path / "second" / "model.safetensors")
    assert files.keys() == files2.keys() and all(torch.equal(files[k], files2[k]) for k in files)


def test_sharded_and_bf16(tmp_path):
    model = make()
    nemotron3.save(model, tmp_path, dtype="bfloat16", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = nemotron3.load(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert loaded.backbone.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        want = ref[k] if k.endswith("e_score_correction_bias") else ref[k].to(torch.bfloat16)
        assert torch.equal(v, want), k


def test_our_checkpoint_loads_in_transformers(tmp_path):
    model = make()
    nemotron3.save(model, tmp_path)
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    ids = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)


def test_transformers_checkpoint_loads_in_ours(tmp_path):
    hf = hf_model_from(make(mtp=False))
    hf.save_pretrained(tmp_path)
    ours = nemotron3.load(tmp_path)
    ids = ids_for(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-5)


def test_fused_expert_layout_and_model_prefix(tmp_path):
    """transformers' in-memory names (`model.`, fused [E, I, l] experts) load too."""
    model = make(mtp=False)
    model.config.save(tmp_path)
    save_file({k: v.contiguous() for k, v in to_hf_state(model).items()}, tmp_path / "model.safetensors")
    loaded = nemotron3.load(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_mtp_weights_ignored_when_config_has_no_mtp(tmp_path):
    model = make()
    nemotron3.save(model, tmp_path)
    cfg = model.config.replace(num_nextn_predict_layers=0)
    assert nemotron3.load(tmp_path, config=cfg).mtp is None


def test_transformers_checkpoint_without_mtp_tensors_loads_backbone(tmp_path):
    """transformers keeps num_nextn_predict_layers in config.json but saves no mtp.* weights."""
    model = make(mtp=True)
    hf = hf_model_from(model)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match="no mtp"):
        ours = nemotron3.load(tmp_path)
    assert ours.mtp is None
    ids = ids_for(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-5)


def test_partial_mtp_tensors_are_an_error(tmp_path):
    _, files = _saved(tmp_path, mtp=True)
    del files["mtp.layers.0.eh_proj.weight"]
    save_file(files, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*mtp\.layers\.0\.eh_proj\.weight"):
        nemotron3.load(tmp_path)


def test_tied_embeddings(tmp_path):
    model = make(mtp=False, tie_word_embeddings=True)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    nemotron3.save(model, tmp_path)
    # written anyway: transformers' NemotronH never ties and would initialise a missing lm_head at random
    files = load_file(tmp_path / "model.safetensors")
    assert torch.equal(files["lm_head.weight"], files["backbone.embeddings.weight"])
    again = nemotron3.load(tmp_path)
    assert again.lm_head.weight is again.backbone.embeddings.weight
    ids = ids_for(model)
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids))
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)
    # a file without lm_head (older writers) still ties
    del files["lm_head.weight"]
    save_file(files, tmp_path / "model.safetensors")
    again = nemotron3.load(tmp_path)
    assert again.lm_head.weight is again.backbone.embeddings.weight


def test_meta_device_instantiation_of_the_largest_preset():
    from nemotron3.presets import count_parameters, get_preset
    cfg = get_preset("ultra")
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    assert model.num_parameters() == count_parameters(cfg)["total_params"]


# ---- bad input ----

def _saved(tmp_path, mtp=False):
    model = make(mtp=mtp)
    nemotron3.save(model, tmp_path)
    return model, load_file(tmp_path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    _, files = _saved(tmp_path)
    del files["backbone.layers.2.mixer.k_proj.weight"]
    save_file(files, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*backbone\.layers\.2\.mixer\.k_proj\.weight"):
        nemotron3.load(tmp_path)


def test_missing_expert_is_named(tmp_path):
    _, files = _saved(tmp_path)
    del files["backbone.layers.1.mixer.experts.3.down_proj.weight"]
    save_file(files, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.down_proj.*missing \[3\]"):
        nemotron3.load(tmp_path)


def test_extra_tensor_is_named(tmp_path):
    _, files = _saved(tmp_path)
    files["backbone.layers.0.mixer.surprise.weight"] = torch.zeros(2)
    save_file(files, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*surprise"):
        nemotron3.load(tmp_path)


def test_wrong_shape_says_expected_and_found(tmp_path):
    _, files = _saved(tmp_path)
    files["backbone.layers.0.mixer.out_proj.weight"] = torch.zeros(32, 31)
    save_file(files, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"out_proj\.weight: expected shape \(32, 32\), found \(32, 31\)"):
        nemotron3.load(tmp_path)


def test_unsupported_dtype(tmp_path):
    _, files = _saved(tmp_path)
    files["backbone.norm_f.weight"] = torch.ones(32, dtype=torch.int32)
    save_file(files, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"norm_f\.weight: unsupported dtype torch\.int32"):
        nemotron3.load(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_weights_are_refused_by_name(tmp_path, bad, dtype):
    _, files = _saved(tmp_path)
    w = files["backbone.layers.1.mixer.experts.3.up_proj.weight"].to(dtype).clone()
    w.view(-1)[-1] = bad                                   # one value, at the very end of the tensor
    files["backbone.layers.1.mixer.experts.3.up_proj.weight"] = w
    save_file(files, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight: holds non-finite values"):
        nemotron3.load(tmp_path)
    files["backbone.layers.1.mixer.experts.3.up_proj.weight"] = w.nan_to_num(0.0)
    files["backbone.norm_f.weight"] = torch.full_like(files["backbone.norm_f.weight"], float("nan"))
    save_file(files, tmp_path / "model.safetensors")      # all-NaN, as the probe found serving
    with pytest.raises(CheckpointError, match=r"backbone\.norm_f\.weight: holds non-finite values"):
        nemotron3.load(tmp_path)


def test_unknown_torch_dtype_is_an_error(tmp_path):
    _saved(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    for bad in ("int8", "float8", "bfloat"):
        (tmp_path / "config.json").write_text(json.dumps({**d, "torch_dtype": bad}))
        with pytest.raises(ConfigError, match=f"torch_dtype: unknown dtype '{bad}'"):
            nemotron3.load(tmp_path)
    d.pop("torch_dtype", None)
    with pytest.raises(ConfigError, match="torch_dtype: unknown dtype 'int8'"):   # transformers 5's `dtype`
        NemotronConfig.from_dict({**d, "dtype": "int8"})
    for good in ("float32", "bfloat16", "float16"):
        assert NemotronConfig.from_dict({**d, "torch_dtype": good}).torch_dtype == good


def test_unknown_pattern_character(tmp_path):
    model, _ = _saved(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["hybrid_override_pattern"] = "MX*"
    del d["layers_block_type"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"unknown pattern character.*'X'"):
        nemotron3.load(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown block type 'conv'"):
        NemotronConfig.from_dict({**d, "layers_block_type": ["mamba", "conv"]})


def test_malformed_config_json(tmp_path):
    _saved(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        nemotron3.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hybrid_override_pattern": "M"}))
    with pytest.raises(ConfigError, match="model_type"):
        nemotron3.load(tmp_path)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        NemotronConfig.from_dict({"hybrid_override_pattern": "M*", "num_hidden_layers": 3})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        NemotronConfig.from_dict({"hybrid_override_pattern": "*", "num_attention_heads": 3, "num_key_value_heads": 2})


def test_pickle_files_are_refused_never_opened(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    make(mtp=False).config.save(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="pickle-based files are never loaded"):
        nemotron3.load(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_safetensors_and_missing_dir(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        nemotron3.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        nemotron3.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        nemotron3.load(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        checkpoint.load_safetensors(tmp_path / "model.safetensors")


def test_config_forms_and_aliases_agree():
    base = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8}
    a = NemotronConfig.from_dict({**base, "hybrid_override_pattern": "ME*-", "mamba_n_groups": 2,
                                  "mamba_d_conv": 3, "mtp_hybrid_override_pattern": "*E"})
    b = NemotronConfig.from_dict({**base, "layers_block_type": ["mamba", "moe", "attention", "mlp"], "n_groups": 2,
                                  "conv_kernel": 3, "mtp_layers_block_type": ["attention", "moe"]})
    c = NemotronConfig.from_dict({**base, "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
                                  "n_groups": 2, "conv_kernel": 3, "time_step_limit": [0.0, {"__float__": "Infinity"}]})
    assert a.pattern == b.pattern == c.pattern == "ME*-"
    assert a.n_groups == b.n_groups == 2 and a.conv_kernel == 3 and a.mtp_pattern == "*E"
    again = NemotronConfig.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again == a
    cfg = transformers.NemotronHConfig(**a.to_dict())
    assert cfg.layers_block_type == ["linear_attention", "moe", "full_attention", "mlp"]


@pytest.mark.parametrize("field, value, match", [
    ("time_step_limit", [0.0, 1.0, 2.0], r"time_step_limit: expected \[min, max\]"),
    ("time_step_limit", None, r"time_step_limit: expected \[min, max\]"),
    ("time_step_limit", ["a", "b"], r"time_step_limit: expected two numbers"),
    ("time_step_limit", [1.0, 0.5], r"time_step_limit: expected 0 <= min <= max"),
    ("use_bias", "false", r"use_bias: expected true or false"),
    ("tie_word_embeddings", "no", r"tie_word_embeddings: expected true or false"),
    ("intermediate_size", 0, r"intermediate_size: expected a positive integer"),
    ("moe_intermediate_size", 0, r"moe_intermediate_size: expected a positive integer"),
    ("moe_shared_expert_intermediate_size", -1, r"moe_shared_expert_intermediate_size: expected a positive"),
    ("num_nextn_predict_layers", "1", r"num_nextn_predict_layers: expected an integer >= 0"),
    ("num_nextn_predict_layers", 1.5, r"num_nextn_predict_layers: expected an integer >= 0"),
    ("layer_norm_epsilon", 0, r"layer_norm_epsilon: expected a positive number"),
    ("routed_scaling_factor", "x", r"routed_scaling_factor: expected a finite number"),
    ("mtp_hybrid_override_pattern", "", r"MTP layer pattern is empty"),
    ("layers_block_type", [["mamba"]], r"layers_block_type\[0\]: unknown block type"),
    ("num_hidden_layers", "4", r"num_hidden_layers \('4'\) does not match"),
])
def test_malformed_config_fields_are_named(field, value, match):
    """Bad values fail in the config with the field's name, not later as a shape or type error in the model."""
    d = {"hybrid_override_pattern": "ME*-", "num_nextn_predict_layers": 1, field: value}
    if field == "layers_block_type":
        del d["hybrid_override_pattern"]
    with pytest.raises(ConfigError, match=match):
        NemotronConfig.from_dict(d)

"""Whole-model NVFP4: recipes, bits per element, quantize_model (packed experts, calibration), ModelOpt
checkpoints (write, read ours and NVIDIA-Nano-like directories), CLI and engine."""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemotron3 import NemotronHForCausalLM
from nemotron3.checkpoint import CheckpointError, load, save
from nemotron3.cli import main as cli_main
from nemotron3.presets import get_preset
from nemotron3.quant import FP8Linear, NVFP4Linear
from nemotron3.quant.modelopt import config_block, read_quant_config
from nemotron3.quant.quantize import NVFP4Experts, quantize_model, quantized_module_formats
from nemotron3.quant.recipe import bits_per_element, get_recipe, mamba_before_attention
from helpers import randomize


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed=0):
    torch.manual_seed(seed)
    return randomize(NemotronHForCausalLM(get_preset("tiny")).eval(), seed)   # M*EM-E + MTP *E, dims % 16 == 0


IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ recipes
def test_nano_recipe_matches_nvidia_exclude_list():
    cfg = get_preset("nano")
    nvfp4_recipe = get_recipe("nvfp4")
    assert sorted(mamba_before_attention(cfg)) == [4, 11, 18, 25, 32, 41]       # hf_quant_config.json (§3.1)
    L = "backbone.layers.{}.mixer.{}"
    assert nvfp4_recipe(cfg, L.format(4, "in_proj")) == nvfp4_recipe(cfg, L.format(41, "out_proj")) == "bf16"
    assert nvfp4_recipe(cfg, L.format(0, "in_proj")) == nvfp4_recipe(cfg, L.format(2, "out_proj")) == "nvfp4"
    assert nvfp4_recipe(cfg, L.format(0, "conv1d")) == "bf16"
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert nvfp4_recipe(cfg, L.format(5, p)) == "bf16"
    for sub in ("experts", "experts.7.up_proj", "shared_experts.up_proj", "shared_experts.down_proj"):
        assert nvfp4_recipe(cfg, L.format(1, sub)) == "nvfp4"
    assert nvfp4_recipe(cfg, L.format(1, "gate")) == "bf16"
    for name in ("lm_head", "backbone.embeddings", "mtp.layers.1.mixer.experts"):
        assert nvfp4_recipe(cfg, name) == "bf16"


def test_mixed_recipe_as_super_ultra():
    cfg = get_preset("super")
    nvfp4_mixed_recipe = get_recipe("nvfp4-mixed")
    L = "backbone.layers.{}.mixer.{}"
    i_m, i_e, i_a = cfg.pattern.index("M"), cfg.pattern.index("E"), cfg.pattern.index("*")
    assert nvfp4_mixed_recipe(cfg, L.format(i_e, "experts")) == "nvfp4"
    assert nvfp4_mixed_recipe(cfg, L.format(i_e, "shared_experts.up_proj")) == "fp8"
    assert nvfp4_mixed_recipe(cfg, L.format(i_m, "in_proj")) == "fp8"
    assert nvfp4_mixed_recipe(cfg, L.format(i_a - 1, "out_proj")) == "fp8"
    for sub in ("fc1_latent_proj", "fc2_latent_proj", "gate"):
        assert nvfp4_mixed_recipe(cfg, L.format(i_e, sub)) == "bf16"
    assert nvfp4_mixed_recipe(cfg, L.format(i_a, "q_proj")) == "bf16"
    for name in ("lm_head", "backbone.embeddings", "mtp.layers.1.mixer.experts", "mtp.layers.0.eh_proj"):
        assert nvfp4_mixed_recipe(cfg, name) == "bf16"


def test_ultra_mixed_bits_per_element_is_5_03():
    """All parameters (MTP, embeddings, lm_head included; MTP BF16): 5.022 vs 16 * 352.3 GB / 1121 GB = 5.028."""
    r = bits_per_element(get_preset("ultra"), "nvfp4-mixed")
    assert r["bits_per_element"] == pytest.approx(5.028, abs=0.01)
    assert r["bytes_bf16"] / 1e9 == pytest.approx(1121, rel=1e-3)
    assert r["bytes"] / 1e9 == pytest.approx(352.3, rel=0.005)
    nano = bits_per_element(get_preset("nano"), "nvfp4")
    assert 4.5 < nano["bits_per_element"] < 5.0 and nano["params"]["fp8"] == 0


def test_info_recipe_cli(capsys):
    cli_main(["info", "ultra", "--recipe", "nvfp4-mixed"])
    assert "recipe nvfp4-mixed: 5.02" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ quantize_model
def _fake_quant_reference(model, quantized):
    """The unquantized model with every quantized weight replaced by its dequantized value."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, mod in quantized.named_modules():
            if isinstance(mod, NVFP4Experts):
                for p in ("up_proj", "down_proj"):
                    getattr(ref.get_submodule(n), p).copy_(
                        torch.stack([mod.dequantized(p, e) for e in range(mod.n_experts)]))
            elif isinstance(mod, (NVFP4Linear, FP8Linear)):
                ref.get_submodule(n).weight.copy_(mod.dequantized_weight())
    return ref


@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4-mixed"])
def test_quantized_model_equals_fake_quant_reference(recipe):
    model = _model()
    q = quantize_model(copy.deepcopy(model), recipe, calib_batches=[IDS])
    fmts = quantized_module_formats(q)
    assert fmts["backbone.layers.2.mixer.experts"] == "nvfp4"
    assert isinstance(q.backbone.layers[2].mixer.experts, NVFP4Experts)
    assert ("backbone.layers.0.mixer.in_proj" in fmts) == (recipe == "nvfp4-mixed")   # layer 0 precedes attention
    ref = _fake_quant_reference(model, q)
    with torch.no_grad():
        out, want, full = q(IDS), ref(IDS), model(IDS)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - full).norm() / full.norm() < 0.2                       # and quantization did something small
    assert not torch.equal(out, full)
    # packed storage: 4.5 bits per NVFP4 element (+ per-tensor scalars), 8 for FP8
    for n, m in q.named_modules():
        if isinstance(m, (NVFP4Linear, NVFP4Experts)):          # + 32 bits per (expert) tensor: <= 0.021 here
            assert m.bits_per_element() == pytest.approx(4.5, abs=0.025), n
            ex = isinstance(m, NVFP4Experts)
            codes, scales = (m.up_proj, m.up_proj_weight_scale) if ex else (m.weight, m.weight_scale)
            assert 8 * (codes.nbytes + scales.nbytes) / (2 * codes.numel()) == 4.5
        elif isinstance(m, FP8Linear):
            assert m.bits_per_element() == pytest.approx(8.0, abs=0.02), n


def test_calibration_sets_modelopt_input_scales():
    model = _model()
    seen = {}
    mods = {"in": model.backbone.layers[3].mixer.in_proj, "sh": model.backbone.layers[2].mixer.shared_experts.up_proj}
    hooks = [m.register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(k, a[0].abs().amax().item()))
             for k, m in mods.items()]
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    q = quantize_model(copy.deepcopy(model), "nvfp4-mixed", calib_batches=[IDS])
    assert q.backbone.layers[3].mixer.in_proj.input_scale.item() == pytest.approx(seen["in"] / 448, rel=1e-6)
    q = quantize_model(copy.deepcopy(model), "nvfp4", calib_batches=[IDS])
    got = q.backbone.layers[2].mixer.shared_experts.up_proj.input_scale.item()
    assert got == pytest.approx(seen["sh"] / 2688, rel=1e-6)
    ex = q.backbone.layers[2].mixer.experts
    assert ex.up_proj_input_scale.shape == (8,) and (ex.up_proj_input_scale > 0).all()
    assert quantize_model(_model(), "nvfp4").backbone.layers[3].mixer.in_proj.input_scale is None


def test_fused_qkv_share_global_scale_and_dtype_moves_keep_codes():
    model = _model()
    q = quantize_model(copy.deepcopy(model), lambda cfg, name: "nvfp4" if name.endswith(("q_proj", "k_proj", "v_proj"))
                       else "bf16", calib_batches=[IDS])
    att = q.backbone.layers[1].mixer
    s = [getattr(att, p).weight_scale_2 for p in ("q_proj", "k_proj", "v_proj")]
    assert s[0] == s[1] == s[2]
    want = torch.stack([model.backbone.layers[1].mixer.get_submodule(p).weight.abs().amax()
                        for p in ("q_proj", "k_proj", "v_proj")]).max() / 2688
    assert s[0].item() == pytest.approx(want.item(), rel=1e-6)
    assert att.q_proj.input_scale == att.k_proj.input_scale == att.v_proj.input_scale
    q.to(torch.bfloat16)                                       # codes and scales keep their dtypes
    assert att.q_proj.weight.dtype == torch.uint8 and att.q_proj.weight_scale_2.dtype == torch.float32
    assert q(IDS).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4-mixed"])
def test_modelopt_checkpoint_round_trip(recipe, tmp_path):
    q = quantize_model(_model(), recipe, calib_batches=[IDS])
    save(q, tmp_path)
    hf = json.loads((tmp_path / "hf_quant_config.json").read_text())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf["producer"]["name"] == "modelopt"
    qz = hf["quantization"]
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert cfg["quantization_config"] == config_block(hf)
    assert "group_size" not in qz if qz["quant_algo"] == "MIXED_PRECISION" else qz["group_size"] == 16
    if recipe == "nvfp4":
        assert qz["quant_algo"] == "NVFP4" and qz["group_size"] == 16
        ex = set(qz["exclude_modules"])
        assert {"lm_head", "backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.q_proj", "mtp.*"} <= ex
        assert "backbone.layers.3.mixer.in_proj" not in ex
    else:
        assert qz["quant_algo"] == "MIXED_PRECISION"
        ql = qz["quantized_layers"]
        assert ql["backbone.layers.2.mixer.experts.7.down_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
        assert ql["backbone.layers.0.mixer.in_proj"] == {"quant_algo": "FP8"}
        assert ql["backbone.layers.5.mixer.shared_experts.up_proj"] == {"quant_algo": "FP8"}
        assert "backbone.layers.1.mixer.q_proj" not in ql and "lm_head" not in ql
    f = safe_open(str(tmp_path / "model.safetensors"), "pt")
    E = "backbone.layers.2.mixer.experts.3.up_proj."                   # [I=48, l=32] per expert
    assert f.get_tensor(E + "weight").dtype == torch.uint8 and f.get_tensor(E + "weight").shape == (48, 16)
    bs = f.get_tensor(E + "weight_scale")
    assert bs.dtype == torch.float8_e4m3fn and bs.shape == (48, 2)
    for s in ("weight_scale_2", "input_scale"):
        assert f.get_tensor(E + s).dtype == torch.float32 and f.get_tensor(E + s).shape == ()
    lin = "backbone.layers.3.mixer.in_proj."
    if recipe == "nvfp4":
        assert f.get_tensor(lin + "weight").shape == (196, 32) and f.get_tensor(lin + "weight_scale").shape == (196, 4)
    else:
        w, ws = f.get_tensor(lin + "weight"), f.get_tensor(lin + "weight_scale")
        assert w.dtype == torch.float8_e4m3fn and w.shape == (196, 64)
        assert ws.shape == () and ws.dtype == torch.float32
    assert "backbone.layers.2.mixer.experts.up_proj" not in f.keys()
    loaded = load(tmp_path)
    assert quantized_module_formats(loaded) == quantized_module_formats(q)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), q(IDS))
    # resave -> identical tensors
    save(loaded, tmp_path / "again")
    g = safe_open(str(tmp_path / "again" / "model.safetensors"), "pt")
    assert set(g.keys()) == set(f.keys())
    assert all(torch.equal(g.get_tensor(k).view(torch.uint8), f.get_tensor(k).view(torch.uint8))
               for k in f.keys() if f.get_tensor(k).dtype in (torch.uint8, torch.float8_e4m3fn))


def test_nano_like_nvidia_directory_loads(tmp_path):
    """A directory laid out like nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4: hf_quant_config.json only (no
    quantization_config in config.json), quant_algo NVFP4 + FP8 KV cache (k_scale/v_scale tensors present),
    bf16 unquantized tensors, per-expert NVFP4 tensors."""
    q = quantize_model(_model(), "nvfp4", calib_batches=[IDS])
    save(q, tmp_path / "ours", dtype="bfloat16")
    src = safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt")
    tensors = {k: src.get_tensor(k) for k in src.keys()}
    tensors["backbone.layers.1.mixer.k_proj.k_scale"] = torch.tensor(1.0)
    tensors["backbone.layers.1.mixer.v_proj.v_scale"] = torch.tensor(1.0)
    for k in ("backbone.layers.3.mixer.in_proj.weight_scale_2",
              "backbone.layers.2.mixer.experts.0.up_proj.input_scale"):
        tensors[k] = tensors[k].reshape(1)                                  # some exports store scalars as [1]
    d = tmp_path / "nano"
    d.mkdir()
    half = len(tensors) // 2
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / fname), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    cfg.pop("quantization_config")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.29.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                         "exclude_modules": ["lm_head", "backbone.layers.0.mixer.in_proj",
                                             "backbone.layers.0.mixer.out_proj", "backbone.layers.1.mixer.q_proj",
                                             "backbone.layers.1.mixer.k_proj", "backbone.layers.1.mixer.v_proj",
                                             "backbone.layers.1.mixer.o_proj", "*latent_proj*", "mtp*"]}}))
    model = load(d)
    assert quantized_module_formats(model) == quantized_module_formats(q)
    ref = load(tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(model(IDS), ref(IDS))


def test_unsupported_quantization_is_refused(tmp_path):
    save(_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "INT4_AWQ"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="INT4_AWQ"):
        load(tmp_path)
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="compressed-tensors"):
        load(tmp_path)


def test_quantize_cli_and_engine(tmp_path, capsys):
    from nemotron3.engine import LLM, SamplingParams
    save(_model(), tmp_path / "src")
    cli_main(["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--recipe", "nvfp4-mixed"])
    assert "recipe nvfp4-mixed" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["quantization_config"]["quant_algo"] == "MIXED_PRECISION"
    f = safe_open(str(tmp_path / "dst" / "model.safetensors"), "pt")
    assert f.get_tensor("backbone.layers.0.mixer.in_proj.weight_scale").dtype == torch.float32
    assert f.get_tensor("backbone.layers.2.mixer.experts.0.up_proj.weight_scale_2").dtype == torch.float32
    assert f.get_tensor("backbone.layers.1.mixer.q_proj.weight").dtype == torch.bfloat16
    assert "backbone.layers.0.mixer.in_proj.input_scale" not in f.keys()       # no --calib: weight-only
    model = load(tmp_path / "dst")
    with torch.no_grad():                                                      # bf16 activations run too
        torch.testing.assert_close(load(tmp_path / "dst", dtype="bfloat16")(IDS), model(IDS), rtol=0.1, atol=0.1)
    llm = LLM(str(tmp_path / "dst"), max_num_seqs=2, block_size=4)
    prompt = [5, 17, 99, 3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert list(out.outputs[0].token_ids) == ids[len(prompt):]


def test_fp8_experts_and_bad_codes_are_refused(tmp_path):
    q = quantize_model(_model(), "nvfp4")
    save(q, tmp_path)
    f = safe_open(str(tmp_path / "model.safetensors"), "pt")
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["backbone.layers.2.mixer.experts.0.up_proj.weight"] = torch.zeros(48, 32).to(torch.float8_e4m3fn)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="experts"):
        load(tmp_path)


def test_calibration_batches_cut_real_text():
    from nemotron3.quant.quantize import calibration_batches

    class Tok:
        eos_id = 2

        def encode(self, text):
            return [ord(c) % 50 + 3 for c in text]

    out = calibration_batches(["hello world " * 10, "more text " * 20], Tok(), n=3, seq_len=32, batch_size=2)
    assert len(out) == 3 and all(b.shape == (2, 32) for b in out)
    assert out[0][0, :5].tolist() == Tok().encode("hello")
    with pytest.raises(ValueError, match="too short"):
        calibration_batches(["hi"], Tok(), n=1, seq_len=32)


# ------------------------------------------------------------------------------------------------ metadata forms
def _vllm_view(qc: dict) -> dict:
    """What vLLM's ``ModelOptQuantConfigBase.from_config`` + ``ModelOptMixedPrecisionConfig._from_config`` take
    from a config.json ``quantization_config`` (no ``quantization`` key): the exclude list from ``ignore``, the KV
    algo from ``kv_cache_scheme``, the per-layer algos from top-level ``quantized_layers``."""
    kv = qc.get("kv_cache_scheme")
    return {"quant_algo": str(qc.get("quant_algo")).upper(), "exclude": qc.get("ignore", []),
            "kv": "FP8" if isinstance(kv, dict) and kv.get("type") == "float" and kv.get("num_bits") == 8 else None,
            "layers": qc.get("quantized_layers", {})}


@pytest.mark.parametrize("recipe,calib", [("nvfp4", True), ("nvfp4", False), ("nvfp4-mixed", True)])
def test_config_json_block_is_modelopts_converted_form(recipe, calib, tmp_path):
    """Regression: config.json's block used to be the flattened hf_quant_config (``exclude_modules``), which vLLM
    (reading config.json first, ``ignore`` only) saw as "nothing excluded". Now it is ModelOpt's
    ``convert_hf_quant_config_format`` output (+ ``quantized_layers`` for MIXED_PRECISION) and reads back."""
    q = quantize_model(_model(), recipe, calib_batches=[IDS] if calib else None)
    save(q, tmp_path)
    hf = json.loads((tmp_path / "hf_quant_config.json").read_text())
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    qz = hf["quantization"]
    assert list(qz)[:2] == ["quant_algo", "kv_cache_quant_algo"] and qz["kv_cache_quant_algo"] is None
    assert qc["quant_method"] == "modelopt" and qc["producer"] == hf["producer"] and hf["producer"]["name"] == "modelopt"
    assert "exclude_modules" not in qc and "kv_cache_scheme" not in qc           # KV cache not quantized
    v = _vllm_view(qc)
    assert v["quant_algo"] == qz["quant_algo"] and v["kv"] is None
    if qz["quant_algo"] == "MIXED_PRECISION":
        assert v["layers"] == qz["quantized_layers"] and v["exclude"] == []
        # as NVIDIA's Super NVFP4 config.json: one group per layer format (first seen first), targets sorted
        fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        g = qc["config_groups"]
        assert list(qc)[:3] == ["config_groups", "quantized_layers", "ignore"]
        assert g["group_0"] == {"input_activations": fp8, "weights": fp8, "targets": sorted(
            n for n, spec in qz["quantized_layers"].items() if spec["quant_algo"] == "FP8")}
        assert g["group_1"]["weights"] == fp4 and "backbone.layers.2.mixer.experts.7.up_proj" in g["group_1"]["targets"]
    else:
        assert qz["quant_algo"] == ("NVFP4" if calib else "W4A16_NVFP4")
        assert set(qz) == {"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"}  # vLLM's required
        assert v["exclude"] == qz["exclude_modules"] and "lm_head" in v["exclude"]
        if calib:
            g = qc["config_groups"]["group_0"]
            fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
            assert g == {"input_activations": fp4, "weights": fp4, "targets": ["Linear"]}
        else:
            assert "config_groups" not in qc                               # as ModelOpt's converter
    # config.json alone (no hf_quant_config.json, like a newer export read by us) loads the same model
    (tmp_path / "hf_quant_config.json").unlink()
    assert read_quant_config(tmp_path, {"quantization_config": qc})["exclude_modules"] == qz.get("exclude_modules", [])
    with torch.no_grad():
        assert torch.equal(load(tmp_path)(IDS), q(IDS))


def test_config_block_fp8_and_kv_forms():
    """FP8 and an FP8 KV cache convert exactly as ModelOpt's ``convert_hf_quant_config_format`` docstring example."""
    hf = {"producer": {"name": "modelopt", "version": "0.19.0"},
          "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    assert config_block(hf) == {
        "config_groups": {"group_0": {"input_activations": fp8, "weights": fp8, "targets": ["Linear"]}},
        "ignore": ["lm_head"], "quant_algo": "FP8", "kv_cache_scheme": fp8,
        "producer": {"name": "modelopt", "version": "0.19.0"}, "quant_method": "modelopt"}
    back = read_quant_config(Path("/nonexistent"), {"quantization_config": config_block(hf)})
    assert back["exclude_modules"] == ["lm_head"] and back["kv_cache_quant_algo"] == "FP8"

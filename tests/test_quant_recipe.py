"""Quantization recipes as JSON rule files: the built-ins re-expressed as files (bits per element unchanged),
NVIDIA's Nano exclude list written byte for byte (conv1d included), irregular per-module MIXED_PRECISION maps
(written by `quantize --recipe FILE`, loaded, run), NVIDIA's Super map as a recipe file, and clear errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import randomize
from nemotron3 import NemotronHForCausalLM
from nemotron3.checkpoint import load, save
from nemotron3.cli import main as cli_main
from nemotron3.engine import LLM, SamplingParams
from nemotron3.model.attention import Attention
from nemotron3.presets import PRESETS, get_preset
from nemotron3.quant.modelopt import hf_quant_config
from nemotron3.quant.quantize import apply_layout, module_formats, quantize_model, quantized_module_formats
from nemotron3.quant.recipe import Recipe, bits_per_element, get_recipe

SUPER_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quant" / "nvfp4-super.json"
IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))

# bits per element of the built-in recipes when they were Python functions (commit 2085b57), every preset
BPE_BEFORE = {("tiny", "nvfp4"): 11.53838533927687, ("tiny", "nvfp4-mixed"): 12.265128339597355,
              ("nano", "nvfp4"): 4.895555451007738, ("nano", "nvfp4-mixed"): 4.9605238611242966,
              ("super", "nvfp4"): 5.021017417558092, ("super", "nvfp4-mixed"): 5.11344676447685,
              ("ultra", "nvfp4"): 4.949326068926365, ("ultra", "nvfp4-mixed"): 5.022171315181666}

# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4 hf_quant_config.json exclude_modules, in NVIDIA's order
# (shared/reference/nemotron3-arch.md §1.2, source CFGT)
_ATT = (5, 12, 19, 26, 33, 42)
_MAMBA_BEFORE = (4, 11, 18, 25, 32, 41)
NANO_EXCLUDE = ["lm_head"] + [
    f"backbone.layers.{i}.mixer.{p}" for m, a in zip(_MAMBA_BEFORE, _ATT)
    for i, p in [(m, "in_proj"), (m, "out_proj"), (a, "q_proj"), (a, "k_proj"), (a, "v_proj"), (a, "o_proj")]
] + [f"backbone.layers.{i}.mixer.conv1d" for i in (0, 2, 4, 7, 9, 11, 14, 16, 18, 21, 23, 25, 28, 30, 32, 35, 37,
                                                    39, 41, 44, 46, 48, 50)]


def _model(seed=0):
    torch.manual_seed(seed)
    return randomize(NemotronHForCausalLM(get_preset("tiny")).eval(), seed)   # M*EM-E + MTP *E


def _meta_quantized(preset: str, recipe) -> NemotronHForCausalLM:
    """A meta-device model laid out as `recipe` quantizes it (calibrated), FP8 KV declared: metadata only."""
    with torch.device("meta"):
        model = NemotronHForCausalLM(get_preset(preset))
    formats = {n: f for n, f in module_formats(model, recipe).items() if f != "bf16"}
    apply_layout(model, formats, set(formats))
    for m in model.modules():
        if isinstance(m, Attention):
            m.k_scale = m.v_scale = 1.0
    return model


@pytest.mark.parametrize("preset", PRESETS)
def test_builtin_recipe_files_keep_bits_per_element(preset):
    for recipe in ("nvfp4", "nvfp4-mixed"):
        assert bits_per_element(get_preset(preset), recipe)["bits_per_element"] == BPE_BEFORE[(preset, recipe)]
    assert isinstance(get_recipe("nvfp4"), Recipe) and get_recipe("nvfp4").name == "nvfp4"


def test_nano_exclude_list_is_nvidias():
    """Our nvfp4 recipe on the Nano preset writes NVIDIA's hf_quant_config.json quantization block exactly:
    NVFP4, FP8 KV cache, group 16, and the 60-entry exclude list (lm_head, 6 x (Mamba in/out_proj + attention
    q/k/v/o_proj), every Mamba conv1d) in NVIDIA's order."""
    q = hf_quant_config(_meta_quantized("nano", "nvfp4"))["quantization"]
    assert q == {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                 "exclude_modules": NANO_EXCLUDE}


def test_super_map_as_a_recipe_file():
    """NVIDIA's Super NVFP4 MIXED_PRECISION map (not uniform per module kind) is one recipe file: 139 FP8
    modules (Mamba in/out_proj of some layers, shared experts, latent projections in layers 1/3/5, two o_proj)
    and 40,961 NVFP4 (every routed expert + layer 1's shared down_proj); the rest BF16."""
    model = _meta_quantized("super", SUPER_RECIPE)
    layers = hf_quant_config(model)["quantization"]["quantized_layers"]
    algos = [v["quant_algo"] for v in layers.values()]
    assert algos.count("FP8") == 139 and algos.count("NVFP4") == 40 * 512 * 2 + 1
    L = "backbone.layers.{}.mixer.{}"
    assert layers[L.format(1, "shared_experts.down_proj")] == {"quant_algo": "NVFP4", "group_size": 16}
    for i, sub in ((69, "o_proj"), (78, "o_proj"), (3, "fc2_latent_proj"), (5, "fc1_latent_proj"), (0, "in_proj")):
        assert layers[L.format(i, sub)] == {"quant_algo": "FP8"}
    for i, sub in ((22, "in_proj"), (7, "o_proj"), (41, "shared_experts.up_proj"), (8, "shared_experts.down_proj"),
                   (5, "fc2_latent_proj"), (1, "gate")):
        assert L.format(i, sub) not in layers
    assert 4.5 < bits_per_element(get_preset("super"), SUPER_RECIPE)["bits_per_element"] < 5.2


IRREGULAR = {
    "name": "irregular",
    "default": "bf16",
    "rules": [
        {"modules": "backbone.layers.*.mixer.in_proj", "layers": [0], "format": "bf16"},
        {"regex": r"backbone\.layers\.3\.mixer\.(in|out)_proj", "format": "fp8"},
        {"modules": ["backbone.layers.0.mixer.out_proj", "backbone.layers.1.mixer.o_proj"], "format": "fp8"},
        {"modules": "backbone.layers.5.mixer.experts", "format": "bf16"},
        {"modules": ["*.mixer.experts", "*.mixer.experts.*"], "format": "nvfp4"},
        {"modules": "backbone.layers.5.mixer.shared_experts.down_proj", "format": "nvfp4"},
        {"modules": "backbone.layers.*.mixer.shared_experts.*", "format": "fp8"},
        {"modules": "backbone.layers.4.mixer.up_proj", "format": "nvfp4"},
    ],
}
IRREGULAR_FORMATS = {
    "backbone.layers.0.mixer.out_proj": "fp8", "backbone.layers.1.mixer.o_proj": "fp8",
    "backbone.layers.2.mixer.experts": "nvfp4", "backbone.layers.2.mixer.shared_experts.up_proj": "fp8",
    "backbone.layers.2.mixer.shared_experts.down_proj": "fp8", "backbone.layers.3.mixer.in_proj": "fp8",
    "backbone.layers.3.mixer.out_proj": "fp8", "backbone.layers.4.mixer.up_proj": "nvfp4",
    "backbone.layers.5.mixer.shared_experts.up_proj": "fp8",
    "backbone.layers.5.mixer.shared_experts.down_proj": "nvfp4", "mtp.layers.1.mixer.experts": "nvfp4"}


def test_irregular_recipe_file_round_trip(tmp_path, capsys):
    """`quantize --recipe FILE` with an irregular per-module map (in_proj BF16 in one Mamba layer and FP8 in
    another, one o_proj FP8, routed experts NVFP4 in one layer and BF16 in the next, a shared down_proj NVFP4 next
    to FP8 ones) writes a MIXED_PRECISION checkpoint naming exactly those modules; it loads and generates."""
    path = tmp_path / "irregular.json"
    path.write_text(json.dumps(IRREGULAR))
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = _model()
    save(model, src)
    cli_main(["quantize", str(src), str(dst), "--recipe", str(path)])
    assert "recipe irregular" in capsys.readouterr().out
    qz = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]
    assert qz["quant_algo"] == "MIXED_PRECISION"
    per_expert = {f"{n}.{e}.{p}" for n, f in IRREGULAR_FORMATS.items() if n.endswith("experts")
                  for e in range(8) for p in ("up_proj", "down_proj")}
    want = {n: f for n, f in IRREGULAR_FORMATS.items() if not n.endswith("experts")}
    assert {n: v["quant_algo"].lower() for n, v in qz["quantized_layers"].items() if n not in per_expert} == want
    assert per_expert <= set(qz["quantized_layers"])
    f = safe_open(str(dst / "model.safetensors"), "pt")
    assert f.get_tensor("backbone.layers.0.mixer.in_proj.weight").dtype == torch.bfloat16
    assert f.get_tensor("backbone.layers.3.mixer.in_proj.weight").dtype == torch.float8_e4m3fn
    assert f.get_tensor("backbone.layers.5.mixer.experts.0.up_proj.weight").dtype == torch.bfloat16
    loaded = load(dst)
    assert quantized_module_formats(loaded) == IRREGULAR_FORMATS
    q = quantize_model(_model(), Recipe.from_file(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), q(IDS), rtol=0.1, atol=0.1)       # bf16 tensors on disk
    out = LLM(str(dst), max_num_seqs=1).generate([[5, 17, 99]], SamplingParams(temperature=0, max_tokens=5,
                                                                               ignore_eos=True))[0]
    with torch.no_grad():
        first = int(loaded(torch.tensor([[5, 17, 99]]))[0, -1].argmax())
    assert out.outputs[0].token_ids[0] == first and len(out.outputs[0].token_ids) == 5
    cli_main(["info", str(src), "--recipe", str(path)])
    assert "recipe irregular:" in capsys.readouterr().out


@pytest.mark.parametrize("data,match", [
    ({"rules": [{"modules": "*", "format": "int4"}]}, "rule 0: unknown format 'int4'"),
    ({"rules": [], "default": "fp4"}, "default: unknown format 'fp4'"),
    ({"rules": [{"modules": "*", "regex": ".*", "format": "fp8"}]}, "exactly one of 'modules'"),
    ({"rules": [{"format": "fp8"}]}, "exactly one of 'modules'"),
    ({"rules": [{"regex": "(", "format": "fp8"}]}, "bad regex"),
    ({"rules": [{"modules": "*", "layers": "attention", "format": "fp8"}]}, "'layers' must be"),
    ({"rules": [{"modules": "*", "layer": [1], "format": "fp8"}]}, r"unknown key\(s\) \['layer'\]"),
    ({"rules": [{"modules": 3, "format": "fp8"}]}, "'modules' must be"),
    ({"rule": []}, "unknown key"),
    ({"name": "x"}, "'rules' must be a list"),
    ([1, 2], "a recipe is a JSON object"),
])
def test_bad_recipe_files_are_refused_clearly(tmp_path, data, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        get_recipe(str(path))


def test_malformed_or_missing_recipe_file(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{"rules": [')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        get_recipe(path)
    with pytest.raises(ValueError, match="unknown quantization recipe 'nope'.*nvfp4-mixed"):
        get_recipe("nope")
    with pytest.raises(SystemExit, match="error: .*unknown format 'int4'"):
        (tmp_path / "int4.json").write_text(json.dumps({"rules": [{"modules": "*", "format": "int4"}]}))
        cli_main(["info", "tiny", "--recipe", str(tmp_path / "int4.json")])

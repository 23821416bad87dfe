"""Lazy loading: tensors stored as the model holds them are views of the file's private mapping (routed experts one
[E, ...] view each), give the eager load's logits exactly, stay off the anonymous heap, and damaged files still
fail clearly."""
import copy
import ctypes
import os

import pytest
import torch

import nemotron3
from helpers import randomize, small_config
from nemotron3 import CheckpointError, NemotronHForCausalLM, checkpoint
from nemotron3.engine import LLM, SamplingParams
from nemotron3.presets import get_preset
from nemotron3.quant.linear import BF16Linear
from nemotron3.quant.quantize import quantize_model
from nemotron3.safetensors_io import read_header


def _file_ranges(path):
    """Address ranges of this process's mappings of `path` (from /proc/self/maps)."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def _in_file(t, ranges):
    p = t.data_ptr()
    return any(lo <= p and p + t.numel() * t.element_size() <= hi for lo, hi in ranges)


def _rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _model(seed=0):
    torch.manual_seed(seed)
    return randomize(NemotronHForCausalLM(small_config("ME*-E", moe_latent_size=16, num_nextn_predict_layers=1)).eval())


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))


def test_fp32_load_maps_every_tensor_and_equals_the_eager_load(tmp_path):
    model = _model()
    nemotron3.save(model, tmp_path)
    lazy, eager = nemotron3.load(tmp_path), nemotron3.load(tmp_path, lazy=False)
    ranges = _file_ranges(tmp_path / "model.safetensors")
    assert ranges
    for name, t in lazy.state_dict().items():
        assert _in_file(t, ranges), name                  # experts too: one [E, ...] view per projection
    assert not any(_in_file(t, ranges) for t in eager.state_dict().values())
    with torch.no_grad():
        assert torch.equal(lazy(_ids(model)), eager(_ids(model)))
        assert torch.equal(lazy(_ids(model)), model(_ids(model)))


def test_sharded_save_keeps_each_projections_experts_in_one_shard(tmp_path):
    model = _model()
    nemotron3.save(model, tmp_path, max_shard_bytes=30_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 3
    lazy = nemotron3.load(tmp_path)
    ranges = [r for f in shards for r in _file_ranges(f)]
    for name, t in lazy.state_dict().items():
        assert _in_file(t, ranges), name
    with torch.no_grad():
        assert torch.equal(lazy(_ids(model)), model(_ids(model)))


def test_writes_stay_private_and_experts_lie_in_expert_order(tmp_path):
    nemotron3.save(_model(), tmp_path)
    _, entries = read_header(tmp_path / "model.safetensors")
    ups = [entries[f"backbone.layers.1.mixer.experts.{e}.up_proj.weight"][2] for e in range(6)]
    assert ups == sorted(ups) and len(set(b - a for a, b in zip(ups, ups[1:]))) == 1
    before = (tmp_path / "model.safetensors").read_bytes()
    m = nemotron3.load(tmp_path)
    with torch.no_grad():
        m.backbone.layers[1].mixer.experts.up_proj.add_(1.0)      # copy-on-write: the file never changes
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_bf16_weights_map_in_place_and_decode_as_the_eager_load(tmp_path):
    """weight_dtype="bfloat16" on a bf16 checkpoint: linears (lm_head too), experts and the embedding table are
    views of the file; the engine's greedy tokens and the logits equal the eager load's."""
    nemotron3.save(_model(), tmp_path, dtype="bfloat16")
    lazy = nemotron3.load(tmp_path, weight_dtype="bfloat16")
    eager = nemotron3.load(tmp_path, weight_dtype="bfloat16", lazy=False)
    ranges = _file_ranges(tmp_path / "model.safetensors")
    assert isinstance(lazy.lm_head, BF16Linear) and lazy.dtype == torch.float32
    bf16 = [(n, t) for n, t in lazy.state_dict().items() if t.dtype == torch.bfloat16]
    assert len(bf16) > 10 and all(_in_file(t, ranges) for _, t in bf16)
    ids = _ids(lazy)
    with torch.no_grad():
        assert torch.equal(lazy(ids), eager(ids))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = [LLM(m, max_num_seqs=1).generate([ids[0].tolist()], greedy)[0].outputs[0].token_ids for m in (lazy, eager)]
    via_path = LLM(str(tmp_path), max_num_seqs=1, weight_dtype="bfloat16").generate([ids[0].tolist()], greedy)
    assert outs[0] == outs[1] == via_path[0].outputs[0].token_ids


def test_engine_default_holds_a_bf16_checkpoint_in_bf16(tmp_path):
    """The engine's weight_dtype="auto" (LLM, AsyncLLMEngine, `serve`): a bf16 checkpoint on CPU is held W16A32
    (the stored values exactly), an fp32 checkpoint stays fp32, "float32" forces copies; greedy tokens agree."""
    model = _model()
    nemotron3.save(model, tmp_path / "bf16", dtype="bfloat16")
    nemotron3.save(model, tmp_path / "fp32", dtype="float32")
    ids = _ids(model)[0].tolist()
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = {}
    for name, path, wd in [("auto", "bf16", "auto"), ("f32", "bf16", "float32"), ("fp32 file", "fp32", "auto")]:
        llm = LLM(str(tmp_path / path), max_num_seqs=1, weight_dtype=wd)
        runs[name] = (isinstance(llm.model.lm_head, BF16Linear), llm.generate([ids], greedy)[0].outputs[0].token_ids)
    assert [held for held, _ in runs.values()] == [True, False, False]
    assert runs["auto"][1] == runs["f32"][1]
    with pytest.raises(ValueError, match="weight_dtype"):
        LLM(str(tmp_path / "bf16"), weight_dtype="float16")


def test_nvfp4_codes_and_scales_map_in_place(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(randomize(NemotronHForCausalLM(get_preset("tiny")).eval(), 3), "nvfp4")
    nemotron3.save(model, tmp_path, dtype="bfloat16")
    lazy = nemotron3.load(tmp_path, weight_dtype="bfloat16")
    eager = nemotron3.load(tmp_path, weight_dtype="bfloat16", lazy=False)
    ranges = _file_ranges(tmp_path / "model.safetensors")
    ex = lazy.backbone.layers[2].mixer.experts
    assert type(ex).__name__ == "NVFP4Experts"
    for n in ("up_proj", "up_proj_weight_scale", "down_proj", "down_proj_weight_scale_2"):
        assert _in_file(getattr(ex, n), ranges), n
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(lazy(ids), eager(ids))


def test_resident_memory_grows_far_less_than_the_file(tmp_path):
    """~200 MB of fp32 weights (a 48K x 512 embedding table and lm_head dominate): loading adds under 5% of the file
    to the anonymous heap and under 10% to the resident set (the NaN scan unmaps the pages it read)."""
    torch.manual_seed(0)
    model = NemotronHForCausalLM(small_config("M*E", vocab_size=49152, hidden_size=512, num_attention_heads=4,
                                              mamba_num_heads=8)).eval()
    nemotron3.save(model, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size > 150e6
    del model
    nemotron3.load(tmp_path)              # first use: one-off allocations (thread pools, caches), not per model
    libc = ctypes.CDLL(None)              # earlier tests' engines keep freed heap memory (engine/cpu_malloc.py):
    if hasattr(libc, "malloc_trim"):      # release it, or the eager copy below reuses it unseen by the RSS measure
        libc.malloc_trim(0)
    before = _rss()
    loaded = nemotron3.load(tmp_path)
    after = _rss()
    assert after["RssAnon"] - before["RssAnon"] < 0.05 * size, (before, after, size)
    assert after["VmRSS"] - before["VmRSS"] < 0.1 * size, (before, after, size)
    eager = nemotron3.load(tmp_path, lazy=False)
    assert _rss()["RssAnon"] - after["RssAnon"] > 0.9 * size        # the measure sees a real copy
    del loaded, eager


def test_damaged_files_still_fail_clearly(tmp_path):
    model = _model()
    nemotron3.save(model, tmp_path)
    f = tmp_path / "model.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[:-1000])                                    # truncated data
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        nemotron3.load(tmp_path)
    f.write_bytes(good[:8] + b"[" + good[9:])                      # broken header JSON
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        nemotron3.load(tmp_path)
    # a NaN inside one expert of a stacked (mapped) projection is named per expert, as the eager load names it
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.backbone.layers[1].mixer.experts.up_proj[3, 2, 1] = float("nan")
    nemotron3.save(bad, tmp_path)
    for lazy in (True, False):
        with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight: holds non-finite values"):
            checkpoint.load(tmp_path, lazy=lazy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -float("nan")])
def test_bit_pattern_finite_scan_finds_every_non_finite_value(dtype, bad):
    """The scan reads exponent bits: NaN and +-inf of every float dtype anywhere (a later chunk too), and the
    largest finite values pass."""
    big = torch.full((300_000,), float(torch.finfo(dtype).max))
    checkpoint._check_finite("w", big.to(dtype))
    checkpoint._check_finite("w", (-big).to(dtype))
    if dtype == torch.float8_e4m3fn and bad in (float("inf"), -float("inf")):
        return                                        # E4M3 has no inf
    big[290_000] = bad
    with pytest.raises(CheckpointError, match="w: holds non-finite values"):
        checkpoint._check_finite("w", big.to(dtype))


def test_startup_line_names_the_weight_formats():
    """`serve` prints how the weights are held: pico (a bf16 checkpoint) in bf16 by default, the NVFP4 export
    as its mix of formats."""
    from pathlib import Path
    from nemotron3.cli import _weight_formats
    models = Path(__file__).resolve().parent.parent / "models"
    assert _weight_formats(LLM(str(models / "pico")).model) == "bfloat16"
    assert _weight_formats(LLM(str(models / "pico"), weight_dtype="float32").model) == "float32"
    assert "nvfp4" in _weight_formats(LLM(str(models / "pico-nvfp4")).model).split(" + ")

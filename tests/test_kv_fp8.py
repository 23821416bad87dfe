"""FP8 E4M3 KV cache: quantize on write / dequantize on read, closeness to bf16 K/V on the trained pico model,
checkpoints declaring kv_cache_quant_algo FP8 (written by `quantize --kv-cache-dtype fp8`, loaded with their
k_scale / v_scale), the engine's kv_cache_dtype flag with prefix caching and speculative decoding, info bytes;
the decode plan (C kernel and torch ops) on FP8 / bf16 K/V: the kernel's encoding bit for bit against torch's,
the same cache bytes and logits as the full forward."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine_utils import agreeing_model, one_thread, tiny_model  # noqa: F401
from helpers import randomize, small_config
from nemotron3 import NemotronHForCausalLM
from nemotron3.checkpoint import CheckpointError, load, save
from nemotron3.cli import main as cli_main
from nemotron3.engine import LLM, SamplingParams
from nemotron3.engine.decode_plan import DecodePlan
from nemotron3.engine.native import native_library
from nemotron3.model.attention import Attention
from nemotron3.model.cache import FP8, HybridCache
from nemotron3.presets import get_preset
from nemotron3.quant.quantize import quantize_model

PICO = Path(__file__).resolve().parent.parent / "models" / "pico"
HAVE_CC = bool(shutil.which("cc") or shutil.which("gcc"))
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _quantizable(seed=0):
    """The tiny preset (M*EM-E + MTP *E, dims multiples of 16), randomized."""
    torch.manual_seed(seed)
    return randomize(NemotronHForCausalLM(get_preset("tiny")).eval(), seed)


def _with_scales(model, k=0.02, v=0.03):
    m = copy.deepcopy(model)
    for a in m.modules():
        if isinstance(a, Attention):
            a.k_scale, a.v_scale = k, v
    return m


def test_cache_quantizes_on_write_and_dequantizes_on_read():
    model = _with_scales(tiny_model(0))
    cache = HybridCache.for_model(model, 2, 4)                     # auto: the model declares FP8 K/V
    assert cache.kv_dtype == FP8 and cache.k[1].dtype == FP8 and cache.conv[0].dtype == torch.float32
    assert cache.kv_scales[1] == cache.kv_scales[6] == (0.02, 0.03)   # backbone layer 1 and the MTP block's
    k = torch.randn(2, 2, 5, 8) * 3
    k[0, 0, 0, 0] = 1e4                                            # beyond 448 * 0.02: saturates, never NaN
    v = torch.randn(2, 2, 5, 8)
    rows = cache.rows(None, 2)
    keys, values, _ = rows.append_kv(1, k, v)
    want_k = (k / 0.02).clamp(-448, 448).to(FP8)
    assert torch.equal(cache.k[1][:, :, :5].view(torch.uint8), want_k.view(torch.uint8))
    torch.testing.assert_close(keys, want_k.float() * 0.02, rtol=0, atol=0)
    torch.testing.assert_close(values, (v / 0.03).to(FP8).float() * 0.03, rtol=0, atol=0)
    assert keys[0, 0, 0, 0].item() == pytest.approx(448 * 0.02) and torch.isfinite(keys).all()
    assert (keys - k)[k.abs() < 1].abs().max() < 0.07                # E4M3: 3 mantissa bits
    # one byte per element: half the bf16 cache, a quarter of fp32
    assert cache.slot_nbytes(100)["kv"] * 2 == HybridCache.for_model(model, 2, 4, "bfloat16").slot_nbytes(100)["kv"]
    assert HybridCache.for_model(tiny_model(0), 1, 4).kv_dtype == torch.float32   # no scales: the model dtype
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'fp16'"):
        HybridCache.for_model(model, 1, 4, "fp16")
    with pytest.raises(ValueError, match="finite and > 0"):
        HybridCache(model.config, 1, 4, kv_dtype=FP8, kv_scales={1: (0.0, 1.0)})


@torch.no_grad()
def test_fp8_kv_close_to_bf16_on_pico():
    """The trained pico model over 384 tokens of its own kind of text, prefilled in 96-token chunks (later chunks
    read earlier K/V back from the cache), with calibrated K/V scales: the next-token argmax agrees with bf16 K/V
    at >= 95% of positions and the mean |logprob difference| of the actual next token stays below 0.15 (measured
    0.98 / 0.05, bench/RESULTS.md); greedy continuation through the engine gives the same tokens."""
    from nemotron3.tokenizer import load_tokenizer
    model = load(PICO, dtype="float32")
    tok = load_tokenizer(PICO)
    text = (Path(__file__).resolve().parent.parent / "nemotron3" / "model" / "cache.py").read_text()
    ids = torch.tensor([tok.encode(text)[:385]])
    calibrated = quantize_model(copy.deepcopy(model), lambda cfg, name: "bf16", [ids[:, :256]],
                                kv_cache_dtype="fp8")
    assert all(0.001 < s < 0.1 for ks in HybridCache.for_model(calibrated, 1).kv_scales.values() for s in ks)
    lp = {}
    for kind, src in (("bfloat16", model), ("fp8", calibrated)):
        cache = HybridCache.for_model(src, 1, 64, kind)
        lp[kind] = torch.cat([torch.log_softmax(model(ids[:, s:s + 96], cache)[0], -1) for s in range(0, 384, 96)])
    nxt = ids[0, 1:385, None]
    agree = (lp["fp8"].argmax(-1) == lp["bfloat16"].argmax(-1)).float().mean()
    dlogp = (lp["fp8"].gather(1, nxt) - lp["bfloat16"].gather(1, nxt)).abs().mean()
    assert agree >= 0.95 and 0 < dlogp < 0.15, (agree, dlogp)
    prompt = ids[0, :200].tolist()
    outs = {kind: LLM(src, tok, max_num_seqs=1, kv_cache_dtype=kind).generate([prompt], GREEDY)[0]
            for kind, src in (("bfloat16", model), ("fp8", calibrated))}
    assert outs["fp8"].outputs[0].token_ids == outs["bfloat16"].outputs[0].token_ids


def _engine_run(model, prompts, **kw):
    llm = LLM(model, max_num_seqs=2, block_size=4, max_num_batched_tokens=20, **kw)
    return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@torch.no_grad()
def _manual_greedy(model, prompt, n, kind):
    cache = HybridCache.for_model(model, 1, 4, kind)
    out, logits = [], model(torch.tensor([prompt]), cache)
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache)
    return out


def test_engine_fp8_prefix_cache_and_speculative_match_plain_fp8():
    """The engine stores FP8 K/V (auto from the model's scales, or forced), decodes through the decode plan, and
    its greedy tokens equal a hand-run FP8 cache's (full forwards); prefix-cache hits (snapshots of FP8 bytes) and MTP
    speculative decoding (rollback by length) give the same tokens as plain FP8 decoding."""
    model = _with_scales(agreeing_model(vocab=64), 0.05, 0.05)
    shared = [7, 3, 9, 11, 13, 2, 5, 8, 21, 34, 55, 4]
    prompts = [shared + [1, 2], shared + [6]]
    llm, plain = _engine_run(model, prompts, enable_prefix_caching=False)
    assert llm.engine.cache.k[1].dtype == FP8 and llm.engine.fast_decode
    assert plain == [_manual_greedy(model, p, 10, "fp8") for p in prompts]
    llm, cached = _engine_run(model, [prompts[0]])
    assert cached[0] == plain[0]
    follow = prompts[0] + cached[0] + [6]                          # the next turn of the same conversation
    again = llm.generate([follow], GREEDY)[0]
    assert again.metrics.num_cached_tokens >= 12                   # restored from an FP8 snapshot
    assert again.outputs[0].token_ids == _engine_run(model, [follow], enable_prefix_caching=False)[1][0]
    for k in (1, 3):
        llm, spec = _engine_run(model, prompts, num_speculative_tokens=k)
        assert spec == plain and llm.stats()["spec_verify_steps"] > 0
    _, forced = _engine_run(agreeing_model(vocab=64), prompts, kv_cache_dtype="fp8")    # no scales: 1.0
    llm, bf16 = _engine_run(model, prompts, kv_cache_dtype="bfloat16")
    assert llm.engine.cache.k[1].dtype == torch.bfloat16 and len(forced[0]) == len(bf16[0]) == 10
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(model, kv_cache_dtype="int8")


def test_quantize_kv_fp8_calibrated_scales():
    """k_scale / v_scale = amax of the k_proj / v_proj output over the calibration batches / 448 (ModelOpt's
    export, no clamp), for backbone and MTP attention layers alike; 1.0 without calibration."""
    model = _quantizable()
    amax = {}
    hooks = [getattr(m, p).register_forward_hook(
        lambda mod, a, out, key=(n, p): amax.__setitem__(key, max(amax.get(key, 0), out.abs().max().item())))
        for n, m in model.named_modules() if isinstance(m, Attention) for p in ("k_proj", "v_proj")]
    with torch.no_grad():
        model.forward_mtp(IDS, 1)
    for h in hooks:
        h.remove()
    q = quantize_model(copy.deepcopy(model), "nvfp4", [IDS], kv_cache_dtype="fp8")
    for n in ("backbone.layers.1.mixer", "mtp.layers.0.mixer"):
        att = q.get_submodule(n)
        assert att.k_scale == pytest.approx(amax[(n, "k_proj")] / 448, rel=1e-6)
        assert att.v_scale == pytest.approx(amax[(n, "v_proj")] / 448, rel=1e-6)
    bare = quantize_model(copy.deepcopy(model), "nvfp4", kv_cache_dtype="fp8")
    assert bare.backbone.layers[1].mixer.k_scale == bare.mtp.layers[0].mixer.v_scale == 1.0
    assert quantize_model(copy.deepcopy(model), "nvfp4").backbone.layers[1].mixer.k_scale is None
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        quantize_model(copy.deepcopy(model), "nvfp4", kv_cache_dtype="e5m2")


def test_fp8_kv_checkpoint_cli_round_trip(tmp_path, capsys):
    """`quantize --kv-cache-dtype fp8` declares kv_cache_quant_algo FP8 (both metadata forms), writes ModelOpt's
    per-layer scale tensors, loads into FP8 K/V buffers that generate, and `info` reports half the KV bytes."""
    save(_quantizable(), tmp_path / "src")
    dst = tmp_path / "dst"
    cli_main(["quantize", str(tmp_path / "src"), str(dst), "--recipe", "nvfp4", "--kv-cache-dtype", "fp8"])
    assert "FP8 KV cache" in capsys.readouterr().out
    qz = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qz["kv_cache_quant_algo"] == "FP8"
    assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    f = safe_open(str(dst / "model.safetensors"), "pt")
    scales = {k: f.get_tensor(k) for k in f.keys() if k.endswith(("k_scale", "v_scale"))}
    assert set(scales) == {f"{p}.mixer.{x}_proj.{x}_scale" for p in ("backbone.layers.1", "mtp.layers.0")
                           for x in "kv"}
    assert all(t.dtype == torch.float32 and t.shape == () and t.item() == 1.0 for t in scales.values())
    model = load(dst)
    assert model.backbone.layers[1].mixer.k_scale == model.mtp.layers[0].mixer.v_scale == 1.0
    llm = LLM(str(dst), max_num_seqs=2, block_size=4)
    assert llm.engine.cache.k[1].dtype == FP8
    got = llm.generate([[5, 17, 99, 3]], GREEDY)[0].outputs[0].token_ids
    assert got == _manual_greedy(model, [5, 17, 99, 3], 10, "fp8")
    assert LLM(str(dst), max_num_seqs=1, kv_cache_dtype="bfloat16").engine.cache.k[1].dtype == torch.bfloat16
    # resave keeps the declaration and the scales
    save(model, tmp_path / "again")
    g = safe_open(str(tmp_path / "again" / "model.safetensors"), "pt")
    assert all(torch.equal(g.get_tensor(k), t) for k, t in scales.items())
    # info: auto reads the declaration, 1 byte per K/V element
    kv = {}
    for flag in ("auto", "bfloat16"):
        cli_main(["info", str(dst), "--json", "--context", "1000", "--kv-cache-dtype", flag])
        kv[flag] = json.loads(capsys.readouterr().out)["cache"]["kv_bytes"]
    assert kv["auto"] * 2 == kv["bfloat16"] > 0
    cli_main(["info", str(tmp_path / "src"), "--context", "1000"])
    assert "layers bf16" in capsys.readouterr().out
    (dst / "hf_quant_config.json").unlink()          # config.json's kv_cache_scheme alone declares it too
    assert load(dst).backbone.layers[1].mixer.k_scale == 1.0


def test_info_ultra_1m_tokens_fp8_halves_kv(capsys):
    for flag, want in (("bfloat16", "KV 12.40 GiB"), ("fp8", "KV 6.20 GiB")):
        cli_main(["info", "ultra", "--context", "1000000", "--kv-cache-dtype", flag])
        assert want in capsys.readouterr().out


def test_nvidia_layout_scales_and_bad_kv_declarations(tmp_path):
    """A checkpoint declaring FP8 K/V with scales only for some layers (1.0 for the rest, as vLLM), scalar or [1];
    scales without the declaration are ignored; other KV algos and bad scales are refused clearly."""
    q = quantize_model(_quantizable(), "nvfp4", [IDS])
    save(q, tmp_path)
    f = safe_open(str(tmp_path / "model.safetensors"), "pt")
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["backbone.layers.1.mixer.k_proj.k_scale"] = torch.tensor([0.25])
    tensors["backbone.layers.1.mixer.v_proj.v_scale"] = torch.tensor(0.5, dtype=torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert load(tmp_path).backbone.layers[1].mixer.k_scale is None          # kv_cache_quant_algo null: not used
    hf = json.loads((tmp_path / "hf_quant_config.json").read_text())

    def declare(algo):
        hf["quantization"]["kv_cache_quant_algo"] = algo
        (tmp_path / "hf_quant_config.json").write_text(json.dumps(hf))
    declare("FP8")
    m = load(tmp_path)
    assert (m.backbone.layers[1].mixer.k_scale, m.backbone.layers[1].mixer.v_scale) == (0.25, 0.5)
    assert m.mtp.layers[0].mixer.k_scale == 1.0
    declare("INT8")
    with pytest.raises(CheckpointError, match="kv_cache_quant_algo 'INT8'"):
        load(tmp_path)
    declare("FP8")
    tensors["backbone.layers.1.mixer.k_proj.k_scale"] = torch.tensor(-1.0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="finite and > 0"):
        load(tmp_path)
    tensors["backbone.layers.0.mixer.k_proj.k_scale"] = torch.tensor(1.0)      # layer 0 is Mamba: no attention
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected"):
        load(tmp_path)


def _kernel_store(x: torch.Tensor, nbytes: int, scale: float) -> torch.Tensor:
    """x [n] fp32 as the C kernel's attention layer stores K/V of `nbytes`-wide elements (n3_kv_store)."""
    out = torch.empty(x.numel(), dtype={2: torch.int16, 1: torch.uint8}[nbytes])
    native_library().n3_kv_store(out.data_ptr(), x.contiguous().data_ptr(), x.numel(), nbytes, scale)
    return out


@needs_cc
def test_kernel_kv_encoding_equals_torch_bit_for_bit():
    """The kernel's E4M3 encoding of x / scale gives `HybridCache.kv_store`'s bytes: every E4M3 value, every
    midpoint between neighbours (ties to even) and the fp32 values one ulp either side, subnormals and the
    underflow to +-0, +-0, 448 and beyond (saturated, inf too), NaN (0x7f with its sign), fp32 subnormals, 2M
    random values of every magnitude and random bit patterns, at scales 1 and not 1; bf16 K/V likewise. Its
    decoding (vectorised 8 codes at a time, the table for the rest) gives `kv_load`'s floats for all 256 codes,
    bit for bit (NaN codes: NaN)."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    vals = codes[torch.isfinite(codes)].unique()
    mids = (vals[1:] + vals[:-1]) / 2                                # ties: 0 vs 2^-9 / 2 included
    near = torch.cat([vals, mids, -mids])
    bits = near.view(torch.int32)
    edge = torch.tensor([0.0, -0.0, 448, -448, 464, 479.99, 480, 500, 1e30, -1e30, float("inf"), -float("inf"),
                         float("nan"), -float("nan"), 2 ** -10, -2 ** -10, 3 * 2 ** -10, 2 ** -11, 1e-40, -1e-45])
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(1_000_000, generator=g) * torch.exp(torch.randn(1_000_000, generator=g) * 4)
    pattern = torch.randint(-2 ** 31, 2 ** 31 - 1, (1_000_000,), generator=g, dtype=torch.int32).view(torch.float32)
    x = torch.cat([near, (bits + 1).view(torch.float32), (bits - 1).view(torch.float32), edge, wide, pattern])
    cfg = small_config("*")
    for scale in (1.0, 0.02, 0.0371, 3.3, 1e-3):
        cache = HybridCache(cfg, 1, 1, kv_dtype=FP8, kv_scales={0: (scale, 1.0)})
        want = cache.kv_store(0, x, x)[0].view(torch.uint8)
        assert torch.equal(_kernel_store(x, 1, scale), want), scale
    assert _kernel_store(torch.tensor([448.0, 1e9, float("nan"), -float("nan"), -0.0]), 1, 1.0).tolist() == \
        [0x7e, 0x7e, 0x7f, 0xff, 0x80]
    want = HybridCache(cfg, 1, 1, kv_dtype=torch.bfloat16).kv_store(0, x, x)[0].view(torch.int16)
    assert torch.equal(_kernel_store(x, 2, 1.0), want)
    lib = native_library()
    for scale in (1.0, 0.0371, 3.3):
        cache = HybridCache(cfg, 1, 1, kv_dtype=FP8, kv_scales={0: (scale, 1.0)})
        for codes in (torch.arange(256, dtype=torch.uint8), torch.arange(255, -1, -1, dtype=torch.uint8)[:251]):
            got = torch.empty(codes.numel())
            lib.n3_kv_load(got.data_ptr(), codes.data_ptr(), codes.numel(), 1, scale)
            want = cache.kv_load(0, codes.view(FP8), codes.view(FP8))[0]
            nan = want.isnan()                                         # 0x7f, 0xff (the payload may differ)
            assert torch.equal(got.isnan(), nan) and nan.sum() == 2
            assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32)), scale     # -0 too


def _two_scale_model():
    """Two attention layers (1 and 6) with their own K/V scales != 1: some keys saturate at 448 (|k| > 0.9 in
    layer 1, > 0.36 in 6: this model's |K| reaches ~1.2), small values go subnormal."""
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(small_config("M*EM-E*M", moe_latent_size=16)).eval(), 2)
    for i, (k, v) in ((1, (0.002, 0.003)), (6, (0.0008, 0.05))):
        model.backbone.layers[i].mixer.k_scale, model.backbone.layers[i].mixer.v_scale = k, v
    return model


@pytest.mark.parametrize("kv", ["fp8", "bfloat16"])
@pytest.mark.parametrize("backend,threads", [pytest.param("native", 1, marks=needs_cc),
                                             pytest.param("native", 2, marks=needs_cc), ("torch", 1)])
def test_plan_on_fp8_kv_equals_full_forward(kv, backend, threads):
    """The decode plan on an FP8 (or bf16) K/V cache, one row and three rows at their own positions, against the
    full forward on a second cache of the same kind: every step's logits equal at 1e-4 (fp32 summation order);
    the K/V bytes they leave are identical except where the two fp32 values (~1e-7 apart) straddle a rounding
    boundary: there the codes are the boundary's two neighbours and the forward's value lies within 1e-6 of it.
    (With layer 1's v_scale 0.003 a subnormal step is 6e-6: one such element of ~1000 here.)"""
    model = _two_scale_model()
    plan = DecodePlan(model, native=backend == "native", threads=threads)
    if backend == "native":
        plan._step_torch = None                                      # every step must run in the kernel
    ids = torch.randint(12, 96, (3, 22), generator=torch.Generator().manual_seed(5))
    for starts, slots in (([6], [1]), ([3, 9, 1], [2, 0, 1])):
        caches = [HybridCache.for_model(model, 3, 4, kv) for _ in range(2)]       # K/V capacity grows too
        assert caches[0].kv_scales[6] == ((0.0008, 0.05) if kv == "fp8" else (1.0, 1.0))
        ref = {(i, x): torch.zeros(3, 2, 32, 8) for i in (1, 6) for x in "kv"}  # the forward's fp32 K/V
        with torch.no_grad():
            for cache in caches:
                for b, (t0, slot) in enumerate(zip(starts, slots)):
                    model(ids[b:b + 1, :t0], cache, slots=[slot])
            for step in range(12):
                toks = [int(ids[b, t0 + step]) for b, t0 in enumerate(starts)]
                got = model.logits(plan.step_rows(toks, caches[0], slots))
                want = []
                for t, s in zip(toks, slots):
                    pos = int(caches[1].lengths[s])
                    hooks = [getattr(model.backbone.layers[i].mixer, f"{x}_proj").register_forward_hook(
                        lambda m, a, out, key=(i, x): ref[key][s, :, pos].copy_(out.view(2, 8))) for i, x in ref]
                    want.append(model(torch.tensor([[t]]), caches[1], slots=[s])[:, -1])
                    for h in hooks:
                        h.remove()
                torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-4)
        assert torch.equal(caches[0].lengths, caches[1].lengths)
        n = int(caches[0].lengths.max())
        for (i, x), fp32 in ref.items():
            a, b = (getattr(c, x)[i][:, :, :n] for c in caches)
            assert a.dtype == b.dtype == (FP8 if kv == "fp8" else torch.bfloat16)
            diff = a.view(torch.uint8) != b.view(torch.uint8)
            if kv == "bfloat16":
                diff = diff.view(*a.shape, 2).any(-1)
            mid = (a[diff].float() + b[diff].float()) / 2 * caches[1].kv_scales[i]["kv".index(x)]
            assert diff.sum() <= 2 and torch.all((fp32[:, :, :n][diff] - mid).abs() < 1e-6), (i, x, diff.sum())
        if kv == "fp8":
            codes = caches[0].k[6][:, :, :n].view(torch.uint8) & 0x7f
            assert (codes == 0x7e).any() and (codes < 8).any()        # saturated and subnormal codes occur


@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=needs_cc)])
def test_engine_fast_decode_on_fp8_kv_equals_full_forward(threads):
    """The engine with an FP8 cache: greedy tokens and their logprobs through the decode plan (the C kernel for one
    and for three sequences) equal `fast_decode=False` (the batched full forward) on the same FP8 cache."""
    model = _two_scale_model()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 3]]
    runs = {}
    for fast in (True, False):
        llm = LLM(model, max_num_seqs=3, threads=threads, fast_decode=fast, enable_prefix_caching=False)
        assert llm.engine.cache.k[1].dtype == FP8 and ("C kernel" in llm.engine.decode_path()) == (fast and HAVE_CC)
        runs[fast] = [o.outputs[0] for o in llm.generate(prompts, params) + llm.generate(prompts[:1], params)]
    for a, b in zip(runs[True], runs[False]):
        assert a.token_ids == b.token_ids
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)

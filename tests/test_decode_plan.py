"""Batch-1 decode fast path (`engine/decode_plan.py`): every step equals the full forward, in the torch ops and
in the C kernel; the engine uses it, rebuilds it after weight updates and falls back where it does not
apply."""
import shutil
import warnings

import pytest
import torch

from engine_utils import one_thread, tiny_model  # noqa: F401
from helpers import randomize, small_config
from nemotron3 import HybridCache, NemotronHForCausalLM
from nemotron3.engine import LLM, SamplingParams
from nemotron3.engine import decode_plan as decode
from nemotron3.engine.decode_plan import DecodePlan, supported
from nemotron3.presets import get_preset
from nemotron3.quant.quantize import quantize_model

VARIANTS = {
    "latent": dict(),
    "biases": dict(use_bias=True, mlp_bias=True),
    "no_latent": dict(moe_latent_size=None),
    "grouped_router": dict(n_routed_experts=8, n_group=4, topk_group=2, norm_topk_prob=False),
    "dt_limit": dict(time_step_limit=(0.01, 0.5), use_conv_bias=False),
    "dt_clamp": dict(mamba_dt_clamp=True, time_step_min=0.05),     # the opt-in clamp at time_step_min
    # odd sizes: no multiple of the C kernel's 4-row / 512-column blocking, MHA, one group, kernel 3,
    # one routed expert per token
    "odd_shapes": dict(hidden_size=37, num_attention_heads=3, num_key_value_heads=3, head_dim=5,
                       intermediate_size=1030, mamba_num_heads=3, mamba_head_dim=7, ssm_state_size=5,
                       n_groups=1, conv_kernel=3, n_routed_experts=5, num_experts_per_tok=1,
                       moe_intermediate_size=9, moe_shared_expert_intermediate_size=11, moe_latent_size=13),
}
# the C kernel must build wherever there is a compiler (CI has one): a broken build fails, not skips
HAVE_CC = bool(shutil.which("cc") or shutil.which("gcc"))
BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not HAVE_CC, reason="no C compiler"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_plan_steps_equal_full_forward(name, backend):
    overrides = {"moe_latent_size": 16, **VARIANTS[name]}
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(small_config("M*EM-E*M", **overrides)).eval(), 1)
    assert supported(model)
    ids = torch.randint(12, 96, (1, 24), generator=torch.Generator().manual_seed(2))
    plan = DecodePlan(model, native=backend == "native")
    assert (plan.native is not None) == (backend == "native")
    with torch.no_grad():
        full = model(ids)[0]
        cache = HybridCache(model.config, 3, max_len=4)          # K/V capacity must grow during decode
        model(ids[:, :9], cache, slots=[2])
        for t in range(9, 24):
            h = plan.step(int(ids[0, t]), cache, 2)
            torch.testing.assert_close(model.logits(h)[0], full[t], rtol=1e-4, atol=1e-4)
        assert int(cache.lengths[2]) == 24 and int(cache.lengths[0]) == 0
        assert cache.ssm[0][:2].abs().sum() == 0 and cache.k[1][:2].abs().sum() == 0    # other slots untouched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["latent", "no_latent", "grouped_router", "odd_shapes"])
def test_plan_rows_at_different_positions_equal_full_forward(name, backend):
    """step_rows: B sequences in their own slots at their own lengths, one token each per call (the C kernel
    reads each weight once for all rows and runs each routed expert once on the rows that chose it)."""
    overrides = {"moe_latent_size": 16, **VARIANTS[name]}
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(small_config("M*EM-E*M", **overrides)).eval(), 2)
    ids = torch.randint(12, 96, (4, 22), generator=torch.Generator().manual_seed(5))
    plan = DecodePlan(model, native=backend == "native")
    starts, slots = [3, 9, 1, 6], [2, 0, 4, 3]
    cache = _rows_equal_full_forward(model, plan, ids, starts, slots, num_slots=5, steps=12)
    assert [int(cache.lengths[s]) for s in slots] == [t0 + 12 for t0 in starts] and int(cache.lengths[1]) == 0


def _rows_equal_full_forward(ref, plan, ids, starts, slots, num_slots, steps):
    """Prefill row b of `ids` up to starts[b] into slots[b], then `steps` step_rows calls, each equal to the full
    forward of `ref` at every row's own position; returns the cache."""
    with torch.no_grad():
        full = ref(ids)
        cache = HybridCache(ref.config, num_slots, max_len=4)
        for b, (t0, slot) in enumerate(zip(starts, slots)):
            ref(ids[b:b + 1, :t0], cache, slots=[slot])
        for step in range(steps):
            toks = [int(ids[b, t0 + step]) for b, t0 in enumerate(starts)]
            h, logits = plan.step_logits(toks, cache, slots, plan.model.lm_head)   # the C kernel: lm_head fused
            want = torch.stack([full[b, t0 + step] for b, t0 in enumerate(starts)])
            torch.testing.assert_close(ref.logits(h), want, rtol=1e-4, atol=1e-4)
            assert (logits is not None) == (plan.native is not None)
            if logits is not None:
                torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    return cache


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4-mixed"])
def test_plan_on_quantized_model_equals_its_full_forward(recipe, backend):
    """NVFP4 / FP8 linears and NVFP4 experts enter the plan dequantized once: each step equals the quantized
    model's own forward (which dequantizes per call), and the engine's greedy tokens equal its generic path."""
    torch.manual_seed(0)
    model = quantize_model(randomize(NemotronHForCausalLM(get_preset("tiny")).eval(), 3), recipe)
    kinds = {type(q).__name__ for q in model.modules()}
    assert "NVFP4Experts" in kinds and ("FP8Linear" in kinds) == (recipe == "nvfp4-mixed")
    assert supported(model)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    plan = DecodePlan(model, native=backend == "native")
    with torch.no_grad():
        full = model(ids)[0]
        cache = HybridCache(model.config, 1, max_len=4)
        model(ids[:, :8], cache)
        for t in range(8, 20):
            torch.testing.assert_close(model.logits(plan.step(int(ids[0, t]), cache, 0))[0], full[t],
                                       rtol=1e-4, atol=1e-4)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = [LLM(model, max_num_seqs=1, fast_decode=f).generate([ids[0, :6].tolist()], greedy)[0].outputs[0].token_ids
            for f in (True, False)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_grows_only_the_backbone_kv(backend):
    """Decode grows the backbone's K/V buffers; the MTP block's stay at their size (nothing drafts)."""
    model = tiny_model(2)
    plan = DecodePlan(model, native=backend == "native")
    cache = HybridCache(model.config, 1, max_len=4)
    for t in range(10):
        plan.step(5 + t, cache, 0)
    n = model.config.num_hidden_layers
    assert all(cache.k[i].shape[2] >= 10 for i in cache.k if i < n)
    assert [cache.k[i].shape[2] for i in cache.k if i >= n] == [4]


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_native_step_checks_input_and_router_bias():
    model = tiny_model(5)
    plan = DecodePlan(model, native=True)
    cache = HybridCache(model.config, 2, max_len=8)
    with pytest.raises(ValueError, match="slot -1 out of range"):
        plan.step(3, cache, -1)
    with pytest.raises(ValueError, match="token id 96 out of range"):
        plan.step(96, cache, 0)
    assert int(cache.lengths.sum()) == 0
    # a cache laid out for another config, or not fp32, never reaches the kernel's raw indexing
    marker = torch.full((1, model.config.hidden_size), 7.0)
    plan._step_torch = lambda *a: marker
    other = HybridCache(tiny_model(5, ssm_state_size=4).config, 2, max_len=8)
    assert plan.step(3, other, 0).eq(7).all()
    other = HybridCache(tiny_model(5, head_dim=4).config, 2, max_len=8)
    assert plan.step_rows([3, 4], other, [1, 0]).eq(7).all()
    assert plan.step(3, HybridCache(model.config, 2, max_len=8, dtype=torch.bfloat16), 0).eq(7).all()
    assert not plan.step_rows([3, 4], cache, [1, 0]).eq(7).all() and cache.lengths.tolist() == [1, 1]
    with pytest.raises(ValueError, match="repeat a slot"):
        plan.step_rows([3, 4], cache, [1, 1])
    with pytest.raises(ValueError, match="one token per slot"):
        plan.step_rows([3], cache, [0, 1])
    assert not plan.stale(full=False)
    gate = model.moe_layers()[0].gate
    gate.e_score_correction_bias = gate.e_score_correction_bias.clone()     # the C layer points at the old one
    assert plan.stale(full=False)


def _bf16_weights(model):
    """(reference, stored): the model with every linear / expert weight rounded to bf16 (fp32 tensors: what the
    full forward runs), and a copy holding those weights as bf16 tensors (what the kernel reads)."""
    import copy
    from torch import nn
    from nemotron3.model.moe import Experts
    with torch.no_grad():
        for mod in model.modules():
            for name in ("weight",) if isinstance(mod, nn.Linear) else ("up_proj", "down_proj") \
                    if isinstance(mod, Experts) else ():
                getattr(mod, name).copy_(getattr(mod, name).bfloat16().float())
        stored = copy.deepcopy(model)
        for mod in stored.modules():
            for name in ("weight",) if isinstance(mod, nn.Linear) else ("up_proj", "down_proj") \
                    if isinstance(mod, Experts) else ():
                setattr(mod, name, nn.Parameter(getattr(mod, name).bfloat16(), requires_grad=False))
    return model, stored


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("name", ["latent", "no_latent", "biases", "odd_shapes"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_bf16_weights_equal_full_forward(name, threads):
    """bf16 weights read as stored (widened in registers), on 1-3 threads: each step equals the full forward on
    the same (bf16-valued) weights, for single rows and for several rows at their own positions."""
    overrides = {"moe_latent_size": 16, **VARIANTS[name]}
    torch.manual_seed(0)
    ref, stored = _bf16_weights(randomize(NemotronHForCausalLM(small_config("M*EM-E*M", **overrides)).eval(), 2))
    plan = DecodePlan(stored, native=True, threads=threads)
    ids = torch.randint(12, 96, (3, 20), generator=torch.Generator().manual_seed(5))
    starts, slots = [3, 9, 1], [2, 0, 1]
    cache = _rows_equal_full_forward(ref, plan, ids, starts, slots, num_slots=3, steps=10)
    with torch.no_grad():
        h1 = plan.step(int(ids[0, 13]), cache, slots[0])
        torch.testing.assert_close(ref.logits(h1)[0], ref(ids)[0, 13], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("recipe", [None, "bf16", "nvfp4", "nvfp4-mixed"])
def test_native_threads_give_identical_steps(recipe):
    """The kernel's result does not depend on its thread count: every output element is computed by one thread
    in a fixed order (routed experts summed per row in routing order), so 1, 2 and 3 threads agree bitwise."""
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(get_preset("tiny")).eval(), 3)
    if recipe == "bf16":
        model = _bf16_weights(model)[1]
    elif recipe:
        model = quantize_model(model, recipe)
    ids = torch.randint(0, 512, (4, 12), generator=torch.Generator().manual_seed(4)).tolist()
    outs = []
    for threads in (1, 2, 3):
        plan = DecodePlan(model, native=True, threads=threads)
        cache = HybridCache(model.config, 4, max_len=4)
        hs = [plan.step_rows([ids[b][t] for b in range(4)], cache, [0, 1, 2, 3]) for t in range(12)]
        hs += [plan.step(ids[0][t], cache, 2) for t in range(3)]
        hs += list(plan.step_logits([ids[b][5] for b in range(3)], cache, [3, 1, 0], model.lm_head))
        outs.append(torch.cat([h.flatten() for h in hs]))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("n_in,n_out", [(16, 1), (48, 7), (64, 515), (256, 1030), (37, 5)])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_matmul_reads_every_format(fmt, n_in, n_out, rows):
    """`decode.matmul` (the engine's lm_head for a few rows) equals F.linear on the dequantized weight, for
    every stored format, vectorised (n_in a multiple of 16) or not, on 1 and 2 threads."""
    from torch import nn
    from nemotron3.quant.linear import FP8Linear, NVFP4Linear
    if fmt == "nvfp4" and n_in % 16:
        pytest.skip("NVFP4 blocks are 16 wide")
    g = torch.Generator().manual_seed(n_in + n_out)
    lin = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
    if fmt == "bf16":
        lin.weight = nn.Parameter(lin.weight.bfloat16(), requires_grad=False)
        ref = lin.weight.float()
    elif fmt == "fp8":
        lin = FP8Linear.from_linear(lin)
        ref = lin.dequantized_weight(torch.float32)
    elif fmt == "nvfp4":
        lin = NVFP4Linear.from_linear(lin)
        ref = lin.dequantized_weight(torch.float32)
    else:
        ref = lin.weight.detach()
    x = torch.randn(rows, n_in, generator=g)
    for threads in (1, 2):
        torch.testing.assert_close(decode.matmul(x, lin, threads), x @ ref.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_fused_head_follows_a_replaced_head_weight():
    """The plan keeps the lm_head's `Mat` between steps; a head whose weight tensor was replaced gets a new one
    (the logits are the new weight's, not a read of the old memory)."""
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(get_preset("tiny")).eval(), 3)
    plan = DecodePlan(model, native=True)
    cache = HybridCache(model.config, 1, max_len=4)
    with torch.no_grad():
        h, logits = plan.step_logits([3], cache, [0], model.lm_head)
        torch.testing.assert_close(logits, model.logits(h), rtol=1e-4, atol=1e-4)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)
        h, logits = plan.step_logits([4], cache, [0], model.lm_head)
        torch.testing.assert_close(logits, model.logits(h), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_native_argmax_is_torchs():
    """The kernel's row argmax (the engine's greedy choice) follows torch.argmax: first maximum on ties, a NaN
    wins (the first NaN), -inf rows give 0."""
    from nemotron3.engine.native import argmax
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (64, 300), generator=g).float()          # many ties
    x[5, 7] = x[5, 200] = float("nan")
    x[6] = -float("inf")
    x[7, 299] = float("inf")
    x[8] = torch.randn(300, generator=g)
    assert argmax(x) == x.argmax(-1).tolist()
    assert argmax(x[:, :7]) is None and argmax(x.double()) is None      # not contiguous fp32: the caller's torch


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("n_in,n_out", [(64, 7), (32, 12), (40, 6)])
def test_matmul_row_blocks(fmt, n_in, n_out):
    """The multi-row kernel's blockings (1 row; 2-3 rows decoded in registers; X^T panels of 8-row vectors, 1-3
    at a time, padded) equal a float64 product on the dequantized weight for row counts on and off every block
    size, vectorised (n_in a multiple of 16) or not, and do not depend on the thread count."""
    from torch import nn
    from nemotron3.quant.linear import FP8Linear, NVFP4Linear
    if fmt == "nvfp4" and n_in % 16:
        pytest.skip("NVFP4 blocks are 16 wide")
    g = torch.Generator().manual_seed(n_in * n_out)
    lin = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
    lin = {"fp32": lambda: lin, "bf16": lambda: lin.bfloat16(), "fp8": lambda: FP8Linear.from_linear(lin),
           "nvfp4": lambda: NVFP4Linear.from_linear(lin)}[fmt]()
    ref = lin.dequantized_weight(torch.float32) if fmt in ("fp8", "nvfp4") else lin.weight.detach().float()
    for rows in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 25, 33):
        x = torch.randn(rows, n_in, generator=g)
        y1, y2 = decode.matmul(x, lin, 1), decode.matmul(x, lin, 2)
        assert torch.equal(y1, y2)
        torch.testing.assert_close(y1.double(), x.double() @ ref.double().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("recipe", [None, "nvfp4"])
def test_native_many_rows_equal_full_forward(recipe):
    """11 rows in one call (X^T panels of 8 rows, padded; routed experts on 1 to several rows each; biases, or
    NVFP4 weights), on 2 threads: each step equals the full forward at every row's own position."""
    torch.manual_seed(0)
    if recipe:                                                     # NVFP4 needs 16-wide blocks: the tiny preset
        model = quantize_model(randomize(NemotronHForCausalLM(get_preset("tiny")).eval(), 3), recipe)
    else:
        config = small_config("M*EM-E*M", moe_latent_size=16, **VARIANTS["biases"])
        model = randomize(NemotronHForCausalLM(config).eval(), 2)
    ids = torch.randint(12, 96, (11, 14), generator=torch.Generator().manual_seed(6))
    plan = DecodePlan(model, native=True, threads=2)
    starts = [1 + b % 5 for b in range(11)]
    _rows_equal_full_forward(model, plan, ids, starts, list(range(11)), num_slots=11, steps=6)


def test_native_build_cache_and_failures(tmp_path, monkeypatch):
    """The kernel is built once into $NEMOTRON3_CACHE/native (atomically, named by source, flags and CPU);
    a failed build warns and leaves the torch ops; NEMOTRON3_NATIVE=0 turns it off."""
    monkeypatch.setenv("NEMOTRON3_CACHE", str(tmp_path))
    decode.native_library.cache_clear()
    try:
        if HAVE_CC:
            assert decode.native_library() is not None
            built = list((tmp_path / "native").iterdir())
            assert len(built) == 1 and built[0].suffix == ".so"
            decode.native_library.cache_clear()
            assert decode.native_library() is not None and list((tmp_path / "native").iterdir()) == built
            decode.native_library.cache_clear()
        monkeypatch.setenv("CC", "false")                                   # a compiler that always fails
        monkeypatch.setenv("NEMOTRON3_CACHE", str(tmp_path / "other"))
        with pytest.warns(UserWarning, match="building the native decode step failed"):
            assert decode.native_library() is None
        assert not any((tmp_path / "other" / "native").iterdir())          # no partial file left
        with pytest.raises(RuntimeError, match="native decode step is not available"):
            DecodePlan(tiny_model(1), native=True)
        decode.native_library.cache_clear()
        monkeypatch.setenv("NEMOTRON3_NATIVE", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert decode.native_library() is None
        assert DecodePlan(tiny_model(1)).native is None
    finally:
        decode.native_library.cache_clear()


def test_engine_rebuilds_plan_after_weight_update():
    model = tiny_model(3)
    llm = LLM(model, max_num_seqs=1, enable_prefix_caching=False)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([[5, 6, 7]], greedy)
    plan = llm.engine._plan
    assert plan is not None
    with torch.no_grad():
        model.backbone.layers[0].mixer.in_proj.weight.mul_(1.5)          # in place, as an optimizer step
    ids = [5, 6, 7]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    out = llm.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids
    assert out == ids[3:]
    assert llm.engine._plan is not plan


def test_fallbacks(monkeypatch):
    model = tiny_model(4)
    model.moe_layers()[0].record_router = True                          # training-time hook: generic path
    assert not supported(model)
    model.moe_layers()[0].record_router = False
    assert supported(model)
    assert not supported(tiny_model(4).to(torch.bfloat16))
    monkeypatch.setattr("nemotron3.engine.decode_plan.MAX_WEIGHT_BYTES", 1000)
    assert supported(model) == HAVE_CC                  # the kernel reads the weights in place: no size limit
    monkeypatch.setenv("NEMOTRON3_NATIVE", "0")
    decode.native_library.cache_clear()
    try:
        assert not supported(model)                     # the torch ops' fp32 copies: limited
    finally:
        decode.native_library.cache_clear()
    monkeypatch.undo()
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[4, 5, 6], [7, 8, 9, 10]]
    a = [o.outputs[0].token_ids for o in LLM(model, max_num_seqs=2, fast_decode=False).generate(prompts, greedy)]
    b = [o.outputs[0].token_ids for o in LLM(model, max_num_seqs=2).generate(prompts, greedy)]
    assert a == b
    assert LLM(model, fast_decode=False).engine.decode_path() == "the batched forward"
    if HAVE_CC:
        assert "C kernel" in LLM(model).engine.decode_path()
    # NEMOTRON3_NATIVE=0: the engine's plan runs in torch ops (batch 1; two sequences take the batched forward)
    monkeypatch.setenv("NEMOTRON3_NATIVE", "0")
    decode.native_library.cache_clear()
    try:
        llm = LLM(model, max_num_seqs=2)
        c = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        assert llm.generate(prompts[:1], greedy)[0].outputs[0].token_ids == a[0] and c == a
        assert llm.engine._plan is not None and llm.engine._plan.native is None
        assert "torch ops" in llm.engine.decode_path()
    finally:
        decode.native_library.cache_clear()


def test_engine_bf16_weights_match_full_forward_greedy():
    """LLM(weight_dtype="bfloat16"): linears and experts stored in bf16 (W16A32), the decode kernel reading them
    as stored, greedy tokens equal to the fp32 model holding the same bf16-rounded values (full forward)."""
    from nemotron3.quant.linear import BF16Linear
    torch.manual_seed(0)
    ref = _bf16_weights(randomize(NemotronHForCausalLM(small_config("M*EM-E*M", moe_latent_size=16)).eval(), 2))[0]
    import copy
    llm = LLM(copy.deepcopy(ref), max_num_seqs=2, weight_dtype="bfloat16", threads=2)
    assert any(isinstance(q, BF16Linear) for q in llm.model.modules()) and supported(llm.model)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    out = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert llm.engine._plan is not None and llm.engine._plan.native is not None
    for p, o in zip(prompts, out):
        ids = list(p)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(ref(torch.tensor([ids]))[0, -1].argmax()))
        assert o == ids[len(p):]

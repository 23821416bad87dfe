"""Numerical parity with transformers' NemotronH (the independent reference) on random small configs."""
import pytest
import torch

from helpers import hf_model_from, randomize, small_config
from nemotron3 import HybridCache, NemotronHForCausalLM

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "dense_mlp_only": dict(pattern="M-*-M-"),
    "moe_no_latent": dict(pattern="MEM*E"),
    "latent_moe": dict(pattern="MEM*EME", moe_latent_size=16),
    "router_groups": dict(pattern="E*ME", n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                          moe_latent_size=8, norm_topk_prob=False, routed_scaling_factor=1.0),
    "many_attention": dict(pattern="*M*E*-*", num_attention_heads=6, num_key_value_heads=3),
    "odd_sizes": dict(pattern="ME*-E", hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=12,
                      mamba_num_heads=6, mamba_head_dim=10, n_groups=3, ssm_state_size=12, chunk_size=7,
                      n_routed_experts=5, num_experts_per_tok=3, moe_intermediate_size=11, moe_latent_size=13,
                      moe_shared_expert_intermediate_size=17, intermediate_size=19, vocab_size=101),
    "biases": dict(pattern="M-ME", use_bias=True, mlp_bias=True, moe_latent_size=16, use_conv_bias=True),
    "no_conv_bias": dict(pattern="M*M", use_conv_bias=False, conv_kernel=3, chunk_size=5),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    return randomize(NemotronHForCausalLM(small_config(**CONFIGS[name])).eval(), seed)


def assert_logits_close(ours, ref):
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seq_len", [1, 13, 37])
def test_logits_match_transformers(name, seq_len):
    model = make(name)
    hf = hf_model_from(model)
    ids = torch.randint(0, model.config.vocab_size, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids, use_cache=False).logits)


def test_left_padding_matches_transformers():
    model = make("latent_moe")
    hf = hf_model_from(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask), hf(ids, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    assert_logits_close(ours[keep], ref[keep])
    # the padded row's real tokens equal the unpadded sequence run alone
    with torch.no_grad():
        alone = model(ids[1:, 6:])
    assert_logits_close(ours[1, 6:], alone[0])


@pytest.mark.parametrize("name", ["latent_moe", "odd_sizes", "many_attention"])
def test_incremental_decode_equals_full_forward(name):
    """Prefill in uneven chunks + single-token decode over a HybridCache == one full forward."""
    model = make(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = HybridCache(model.config, num_slots=2, max_len=3)   # forces K/V growth too
        parts, t = [], 0
        for n in (9, 1, 17, 1, 1, 5, 1, 1, 1, 1, 1, 1):
            parts.append(model(ids[:, t:t + n], cache))
            t += n
    assert t == 40
    assert_logits_close(torch.cat(parts, 1), full)


def test_ragged_slots_equal_full_forward():
    """Rows continuing different slots at different positions (continuous batching) stay exact."""
    model = make("latent_moe")
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = HybridCache(model.config, num_slots=4)
        model(ids[0:1, :11], cache, slots=[2])
        model(ids[1:2, :4], cache, slots=[0])
        model(ids[2:3, :16], cache, slots=[3])
        pos = {0: 11, 1: 4, 2: 16}
        for _ in range(5):
            step = torch.stack([ids[r, pos[r]:pos[r] + 1] for r in range(3)])
            out = model(step, cache, slots=[2, 0, 3])
            for r in range(3):
                assert_logits_close(out[r, 0], full[r, pos[r]])
                pos[r] += 1
    assert cache.lengths.tolist() == [9, 0, 16, 21]


def test_dt_below_time_step_min_matches_transformers():
    """Heads whose dt = softplus(. + dt_bias) falls below time_step_min are not clamped (transformers 5.x,
    vLLM, llama.cpp never clamp): full forward and cached decode both equal transformers. Group 0 of every
    Mamba layer has only such heads and no D skip, and the gated norm's eps is tiny, so its normalised output
    depends on dt's size: the opt-in `mamba_dt_clamp` moves the logits by ~25% here (checked below)."""
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(small_config("MEM*EME", moe_latent_size=16,
                                                        layer_norm_epsilon=1e-12)).eval())
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "dt_bias"):
                m.dt_bias[:2] = -9.0                        # softplus(-9) ~ 1.2e-4 < time_step_min = 1e-3
                m.D[:2] = 0.0                               # heads 0, 1 = group 0 (4 heads, 2 groups)
    assert not model.config.mamba_dt_clamp
    hf = hf_model_from(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert_logits_close(model(ids), ref)
        cache = HybridCache(model.config, num_slots=2)
        parts = [model(ids[:, :10], cache)] + [model(ids[:, t:t + 1], cache) for t in range(10, 24)]
        assert_logits_close(torch.cat(parts, 1), ref)
        model.config.mamba_dt_clamp = True
        try:
            assert (model(ids) - ref).abs().max() > 0.05 * ref.abs().max()
        finally:
            model.config.mamba_dt_clamp = False


def test_bf16_forward_close_to_transformers_bf16():
    model = make("latent_moe")
    hf = hf_model_from(model).to(torch.bfloat16)
    ours = model.to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ours(ids), hf(ids, use_cache=False).logits
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


def test_malformed_inputs_raise_clear_errors():
    model = make("latent_moe")
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    cache = HybridCache(model.config, num_slots=2)
    cases = [
        (lambda: model(ids[:, :0]), "input_ids is empty"),
        (lambda: model(ids, attention_mask=[[1] * 5] * 2), "attention_mask must be a"),
        (lambda: model(ids, attention_mask=torch.full((2, 5), 2)), "only 0 .padding. and 1"),
        (lambda: model(ids[:1], cache, slots=[2]), r"slots \[2\] out of range"),
        (lambda: model(ids[:1], cache, slots=[-1]), r"slots \[-1\] out of range"),
        (lambda: model(ids, cache, slots=[1, 1]), "repeat a slot"),
        (lambda: model(ids, HybridCache(small_config("MM"), num_slots=2)), "different model config"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    assert cache.lengths.tolist() == [0, 0]          # nothing was written by the rejected calls


def test_malformed_mtp_inputs_raise_clear_errors():
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(small_config("M*E", num_nextn_predict_layers=1)).eval())
    h = torch.zeros(1, 5, model.config.hidden_size)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="matching next_ids"):
        model.mtp_step(h, ids[:, :4])
    with pytest.raises(ValueError, match="token id out of range"):
        model.mtp_step(h, ids + model.config.vocab_size)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        model.mtp_step(h, ids, depth=0)
    with pytest.raises(ValueError, match="depths must be an integer >= 0"):
        model.forward_mtp(ids, depths=-1)

"""Batch-1 decode fast path (`model/decode.py`): every step equals the full forward; the engine uses it,
rebuilds it after weight updates and falls back where it does not apply."""
import pytest
import torch

from engine_utils import one_thread, tiny_model  # noqa: F401
from helpers import randomize, small_config
from nemotron3 import HybridCache, NemotronHForCausalLM
from nemotron3.engine import LLM, SamplingParams
from nemotron3.model.decode import DecodePlan, supported

VARIANTS = {
    "latent": dict(),
    "biases": dict(use_bias=True, mlp_bias=True),
    "no_latent": dict(moe_latent_size=None),
    "grouped_router": dict(n_routed_experts=8, n_group=4, topk_group=2, norm_topk_prob=False),
    "dt_limit": dict(time_step_limit=(0.01, 0.5), mamba_dt_clamp=False, use_conv_bias=False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_plan_steps_equal_full_forward(name):
    overrides = {"moe_latent_size": 16, **VARIANTS[name]}
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(small_config("M*EM-E*M", **overrides)).eval(), 1)
    assert supported(model)
    ids = torch.randint(12, 96, (1, 24), generator=torch.Generator().manual_seed(2))
    plan = DecodePlan(model)
    with torch.no_grad():
        full = model(ids)[0]
        cache = HybridCache(model.config, 3, max_len=4)          # K/V capacity must grow during decode
        model(ids[:, :9], cache, slots=[2])
        for t in range(9, 24):
            h = plan.step(int(ids[0, t]), cache, 2)
            torch.testing.assert_close(model.logits(h)[0], full[t], rtol=1e-4, atol=1e-4)
        assert int(cache.lengths[2]) == 24 and int(cache.lengths[0]) == 0


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
    monkeypatch.setattr("nemotron3.model.decode.MAX_WEIGHT_BYTES", 1000)
    assert not supported(model)
    monkeypatch.undo()
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(model, max_num_seqs=1, fast_decode=False).generate([[4, 5, 6]], greedy)[0].outputs[0].token_ids
    b = LLM(model, max_num_seqs=1).generate([[4, 5, 6]], greedy)[0].outputs[0].token_ids
    assert a == b

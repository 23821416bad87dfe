"""Long contexts with bounded memory: chunked prefill through the prefix/causal log-sum-exp attention equals
a full forward, the segmented SSD scan equals the single-segment one, the engine accepts max_model_len
beyond the config's and does not over-reserve K/V."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from engine_utils import one_thread, tiny_model  # noqa: F401  (autouse fixture)
from nemotron3 import HybridCache
from nemotron3.model import mamba2
from nemotron3.model.attention import prefix_causal_attention, prefix_causal_mask
from nemotron3.model.cache import PrefixCausal


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4), (8, 2)])
@pytest.mark.parametrize("prefix,T", [(0, 7), (5, 1), (13, 9), (40, 3)])
def test_prefix_causal_attention_equals_masked_sdpa(hq, hkv, prefix, T):
    g = torch.Generator().manual_seed(prefix * 31 + T)
    B, D = 2, 16
    q = torch.randn(B, hq, T, D, generator=g).transpose(1, 2).contiguous().transpose(1, 2)  # strided like the model
    k = torch.randn(B, hkv, prefix + T + 4, D, generator=g)[:, :, :prefix + T]              # cache-buffer view
    v = torch.randn(B, hkv, prefix + T + 4, D, generator=g)[:, :, :prefix + T]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=prefix_causal_mask(T, prefix + T, prefix, "cpu"),
                                         enable_gqa=hq != hkv)
    out = prefix_causal_attention(q, k, v, prefix)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 5, 16, 37])
def test_chunked_prefill_equals_full_forward(chunk):
    model = tiny_model(seed=3, pattern="M*EM*E", mtp=False)
    T = 83
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(chunk))
    full = model(ids)
    cache = HybridCache(model.config, num_slots=2, max_len=8)
    pieces = [model(ids[:, s:s + chunk], cache) for s in range(0, T, chunk)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_chunked_prefill_uses_no_mask(monkeypatch):
    """The uniform-row path must not hand SDPA a [T, S] mask (that forces the math kernel on CPU)."""
    model = tiny_model(seed=1, pattern="M*E", mtp=False)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cache = HybridCache(model.config, num_slots=1, max_len=8)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    for s in range(0, 40, 16):
        model(ids[:, s:s + 16], cache)
    assert all(m is None for m in seen)


@torch.no_grad()
def test_ragged_rows_keep_the_bool_mask():
    model = tiny_model(seed=2, pattern="M*E", mtp=False)
    cache = HybridCache(model.config, num_slots=2, max_len=8)
    a = torch.randint(0, model.config.vocab_size, (1, 9))
    b = torch.randint(0, model.config.vocab_size, (1, 4))
    model(a, cache, slots=[0])
    model(b, cache, slots=[1])
    rows = cache.rows(torch.tensor([0, 1]), 2)
    _, _, mask = rows.append_kv(1, torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8))
    assert isinstance(mask, torch.Tensor) and mask.shape == (2, 1, 3, 12)
    rows = cache.rows(torch.tensor([0]), 1)
    _, _, mask = rows.append_kv(1, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    assert mask == PrefixCausal(9)


@torch.no_grad()
def test_segmented_ssd_scan_equals_single_segment(monkeypatch):
    g = torch.Generator().manual_seed(0)
    b, l, h, p, gr, n, cs = 2, 150, 4, 8, 2, 8, 8
    x, B, C = torch.randn(b, l, h, p, generator=g), torch.randn(b, l, gr, n, generator=g), torch.randn(b, l, gr, n, generator=g)
    dt = F.softplus(torch.randn(b, l, h, generator=g))
    A = -torch.rand(h, generator=g) - 0.5
    init = torch.randn(b, h, p, n, generator=g)
    monkeypatch.setattr(mamba2, "SEGMENT_CHUNKS", 1000)
    y1, s1 = mamba2.ssd_scan(x, dt, A, B, C, cs, init)
    monkeypatch.setattr(mamba2, "SEGMENT_CHUNKS", 3)              # 24-token segments, last one partial
    y2, s2 = mamba2.ssd_scan(x, dt, A, B, C, cs, init)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-5)


def test_engine_max_model_len_above_config_and_capacity_limit():
    from nemotron3.engine import LLM, SamplingParams
    model = tiny_model(seed=4, mtp=False, max_position_embeddings=64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        llm = LLM(model, max_num_seqs=1, max_model_len=300, enable_prefix_caching=False,
                  max_num_batched_tokens=64)
    assert any("max_position_embeddings" in str(x.message) for x in w)
    prompt = torch.randint(0, model.config.vocab_size, (290,)).tolist()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    cap = llm.engine.cache.k[1].shape[2]
    assert 295 <= cap <= 300                     # grown to the limit, not doubled to 512
    # greedy tokens equal a full forward's argmax chain
    ids = list(prompt)
    for _ in range(5):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out[0].outputs[0].token_ids == ids[len(prompt):]

"""NVFP4Linear / FP8Linear: packed storage under ModelOpt names, W4A16 forward == F.linear(x, dequant(W))."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.quant import FP8Linear, NVFP4Linear
from nemotron3.quant import nvfp4 as q

torch.set_num_threads(1)


def _linear(k, n, bias, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [7, 1024])
def test_nvfp4_linear_matches_dequantized_reference(bias, chunk_rows):
    lin = _linear(64, 40, bias)
    m = NVFP4Linear.from_linear(lin, chunk_rows=chunk_rows)
    sd = m.state_dict()
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (40, 32)
    assert sd["weight_scale"].dtype == torch.float8_e4m3fn and sd["weight_scale"].shape == (40, 4)
    assert sd["weight_scale_2"].dtype == torch.float32 and sd["weight_scale_2"].shape == ()
    assert not any(p.requires_grad for p in m.parameters())
    packed, bs, s2 = q.quantize(lin.weight.detach())
    assert torch.equal(sd["weight"], packed) and torch.equal(sd["weight_scale"].float(), bs.float())
    w = q.dequantize(packed, bs, s2)
    x = torch.randn(3, 5, 64)
    ref = F.linear(x, w, lin.bias)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    # quantization error of the layer output is small relative to the fp32 layer
    err = (m(x) - lin(x)).norm() / lin(x).norm()
    assert err < 0.15


def test_nvfp4_linear_bf16_activations_and_state_dict_round_trip():
    lin = _linear(32, 48, True, seed=1, dtype=torch.bfloat16)
    m = NVFP4Linear.from_linear(lin, chunk_rows=16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), m.dequantized_weight(torch.float32), lin.bias.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    m2 = NVFP4Linear(32, 48, bias=True)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), y)


def test_nvfp4_linear_memory_is_4_5_bits_per_element():
    m = NVFP4Linear.from_linear(_linear(256, 128, False))
    bpe = m.bits_per_element()
    assert bpe == pytest.approx(4.5 + 32 / (256 * 128))
    held = sum(b.numel() * b.element_size() for b in m.buffers())
    assert 8 * held / (256 * 128) == pytest.approx(4.5, abs=1e-3)


def test_nvfp4_linear_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Linear(24, 8)
    m = NVFP4Linear(32, 8)
    with pytest.raises(ValueError, match="last dim"):
        m(torch.randn(2, 16))


@pytest.mark.parametrize("chunk_rows", [5, 1024])
def test_fp8_linear(chunk_rows):
    lin = _linear(48, 24, True, seed=2)
    m = FP8Linear.from_linear(lin, chunk_rows=chunk_rows)
    sd = m.state_dict()
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight"].shape == (24, 48)
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == ()
    w8, s = q.quantize_fp8(lin.weight.detach())
    assert torch.equal(sd["weight"].view(torch.uint8), w8.view(torch.uint8))
    x = torch.randn(6, 48)
    torch.testing.assert_close(m(x), F.linear(x, q.dequantize_fp8(w8, s), lin.bias), rtol=1e-5, atol=1e-5)
    assert m.bits_per_element() == pytest.approx(8 + 32 / (24 * 48))
    assert (m(x) - lin(x)).norm() / lin(x).norm() < 0.05


def test_forward_dequantizes_in_bounded_row_chunks(monkeypatch):
    m = NVFP4Linear.from_linear(_linear(32, 50, False), chunk_rows=16)
    seen = []
    orig = m._dequant_rows

    def spy(r0, r1, dtype):
        w = orig(r0, r1, dtype)
        seen.append(tuple(w.shape))
        return w

    monkeypatch.setattr(m, "_dequant_rows", spy)
    x = torch.randn(2, 32)
    y = m(x)
    assert seen == [(16, 32), (16, 32), (16, 32), (2, 32)]
    torch.testing.assert_close(y, F.linear(x, m.dequantized_weight()), rtol=1e-5, atol=1e-5)

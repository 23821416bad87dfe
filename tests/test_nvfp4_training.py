"""NVFP4 pretraining-recipe emulation: RHT cancels, forward operands, gradients close to high precision."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.quant import nvfp4 as q
from nemotron3.quant.training import NVFP4TrainLinear, hadamard16, nvfp4_linear, rht

torch.set_num_threads(1)


def test_hadamard_orthogonal_and_cancels_exactly():
    m = hadamard16()
    assert set(m.abs().unique().tolist()) == {0.25}
    assert torch.equal(m @ m.t(), torch.eye(16))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 64, generator=g), torch.randn(5, 64, generator=g)
    ra, rb = rht(a, m), rht(b, m)
    assert not torch.allclose(ra, a)
    torch.testing.assert_close(ra @ rb.t(), a @ b.t(), rtol=1e-5, atol=1e-5)
    # with integer-valued inputs every product and sum is exact in fp32: the cancellation is bit-exact
    ai, bi = torch.randint(-8, 8, (8, 64), generator=g).float(), torch.randint(-8, 8, (5, 64), generator=g).float()
    assert torch.equal(rht(ai, m) @ rht(bi, m).t(), ai @ bi.t())


def test_forward_uses_1x16_activations_and_16x16_weights():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 3, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    y = nvfp4_linear(x, w, b)
    ref = F.linear(q.fake_quantize(x), q.fake_quantize_2d(w), b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [64, 37])  # 37: tokens zero-padded to a multiple of 16 for the wgrad RHT
def test_gradients_close_to_high_precision(tokens):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 64, generator=g, requires_grad=True)
    w = (torch.randn(32, 64, generator=g) / 8).requires_grad_(True)
    b = torch.zeros(32, requires_grad=True)
    dy = torch.randn(tokens, 32, generator=g)
    nvfp4_linear(x, w, b, generator=torch.Generator().manual_seed(3)).backward(dy)
    gx, gw, gb = x.grad.clone(), w.grad.clone(), b.grad.clone()
    x.grad = w.grad = b.grad = None
    F.linear(x, w, b).backward(dy)

    def rel(a, r):
        return ((a - r).norm() / r.norm()).item()
    # each NVFP4 operand carries ~10% relative error; a product of two carries ~15%
    assert rel(gx, x.grad) < 0.25 and rel(gw, w.grad) < 0.25
    assert torch.equal(gb, b.grad)
    # and the wgrad with RHT and without agree to within that error (the transform cancels)
    x.grad = w.grad = None
    nvfp4_linear(x, w, None, use_rht=False, stochastic=False).backward(dy)
    assert rel(w.grad, gw) < 0.35


def test_stochastic_dgrad_is_unbiased():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 32, generator=g, requires_grad=True)
    w = torch.randn(16, 32, generator=g)
    dy = torch.randn(16, 16, generator=g)
    gen = torch.Generator().manual_seed(5)
    acc = torch.zeros_like(x)
    n = 400
    for _ in range(n):
        x.grad = None
        nvfp4_linear(x, w, None, generator=gen).backward(dy)
        acc += x.grad
    ref = dy @ q.fake_quantize_2d(w)  # expectation of SR(dy) is dy (up to block-max clipping)
    assert ((acc / n - ref).norm() / ref.norm()).item() < 0.03
    rne = q.fake_quantize(dy) @ q.fake_quantize_2d(w)
    assert ((acc / n - ref).norm() < (rne - ref).norm())


def test_module_drop_in_and_bf16_switch():
    torch.manual_seed(6)
    lin = nn.Linear(32, 16)
    m = NVFP4TrainLinear.from_linear(lin, generator=torch.Generator().manual_seed(7))
    x = torch.randn(4, 32)
    assert not torch.equal(m(x), lin(x))
    m.enabled = False
    assert torch.equal(m(x), lin(x))
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4TrainLinear(32, 24)


def test_short_training_tracks_high_precision():
    def run(nvfp4_on):
        torch.manual_seed(8)
        g = torch.Generator().manual_seed(9)
        teacher = torch.randn(16, 32, generator=g)
        model = nn.Sequential(NVFP4TrainLinear(32, 64, generator=torch.Generator().manual_seed(10)), nn.GELU(),
                              NVFP4TrainLinear(64, 16, generator=torch.Generator().manual_seed(11)))
        for mod in model:
            if isinstance(mod, NVFP4TrainLinear):
                mod.enabled = nvfp4_on
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(150):
            xb = torch.randn(64, 32, generator=g)
            loss = F.mse_loss(model(xb), torch.tanh(xb @ teacher.t()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return sum(losses[-20:]) / 20, losses[0]

    hp, hp0 = run(False)
    fp4, fp40 = run(True)
    assert hp < 0.5 * hp0 and fp4 < 0.5 * fp40          # both learn
    assert abs(fp4 - hp) / hp < 0.15, (fp4, hp)          # NVFP4 tracks the high-precision loss


def test_padded_layer_matches_zero_padded_tiles():
    """pad=True (used for Mamba in_proj widths like 196): zero-padding to 16x16 tiles, then cropping."""
    g = torch.Generator().manual_seed(12)
    lin = nn.Linear(40, 24)
    m = NVFP4TrainLinear.from_linear(lin, pad=True, generator=torch.Generator().manual_seed(13))
    x = torch.randn(5, 40, generator=g, requires_grad=True)
    wp = F.pad(lin.weight.detach(), (0, 8, 0, 8))                      # [32, 48]
    ref = F.linear(q.fake_quantize(F.pad(x.detach(), (0, 8)))[:, :40], q.fake_quantize_2d(wp)[:24, :40], lin.bias)
    y = m(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad.shape == x.shape and m.weight.grad.shape == m.weight.shape and torch.isfinite(m.weight.grad).all()

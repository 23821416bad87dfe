"""CPU prefill paths (issue 21): the matmul-form SSD scan equals the token-by-token recurrence (and trains),
its transposed decay matrix equals exp(segsum) exactly, the time-major K-tap conv equals F.conv1d, and the
engine's malloc settings apply once (and defer to the environment)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nemotron3.engine import cpu_malloc
from nemotron3.model import mamba2


def _ssd_inputs(b, l, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 1)
    A = -torch.rand(h, generator=gen) * 4 - 0.5
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    return x, dt, A, B, C, torch.randn(b, h, p, n, generator=gen)


@pytest.mark.parametrize("l,cs,init", [(37, 8, True), (64, 16, False), (5, 16, True), (16, 16, False)])
def test_ssd_scan_equals_recurrence(l, cs, init):
    b, h, p, g, n = 2, 4, 8, 2, 8
    x, dt, A, B, C, s0 = _ssd_inputs(b, l, h, p, g, n, seed=l)
    state = s0 if init else torch.zeros(b, h, p, n)
    ys = []
    for t in range(l):
        y, state = mamba2.ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    y, final = mamba2.ssd_scan(x, dt, A, B, C, cs, s0 if init else None)
    assert y.shape == (b, l, h, p) and final.shape == (b, h, p, n)
    torch.testing.assert_close(y, torch.stack(ys, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, state, rtol=1e-4, atol=1e-4)


def test_ssd_scan_backward_matches_recurrence():
    """Training runs the same scan under autograd: gradients equal those through the recurrence."""
    b, l, h, p, g, n = 1, 20, 4, 4, 2, 4
    base = _ssd_inputs(b, l, h, p, g, n, seed=3)[:5]
    grads = []
    for scan in (True, False):
        x, dt, A, B, C = (t.clone().requires_grad_() for t in base)
        if scan:
            y, _ = mamba2.ssd_scan(x, dt, A, B, C, 8)
        else:
            state, ys = torch.zeros(b, h, p, n), []
            for t in range(l):
                yt, state = mamba2.ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
                ys.append(yt)
            y = torch.stack(ys, 1)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([t.grad for t in (x, dt, A, B, C)])
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_decay_matrix_t_is_segsum_exactly_on_and_above_the_diagonal():
    a = -torch.rand(2, 3, 5, 64) * 3
    assert torch.equal(mamba2.decay_matrix_t(a).triu(), torch.exp(mamba2.segsum(a)).transpose(-1, -2))


@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_equals_conv1d(bias):
    gen = torch.Generator().manual_seed(1)
    Bsz, T, Cd, K = 2, 11, 6, 4
    conv = torch.nn.Conv1d(Cd, Cd, K, groups=Cd, bias=bias)
    window = torch.randn(Bsz, K - 1 + T, Cd, generator=gen)                        # [B, K-1+T, C]
    ref = F.conv1d(window.transpose(1, 2), conv.weight, conv.bias, groups=Cd).transpose(1, 2)
    torch.testing.assert_close(mamba2.causal_conv(window, conv.weight, conv.bias), ref, rtol=1e-6, atol=1e-6)


def test_keep_freed_memory_once_and_env_wins():
    code = "from nemotron3.engine import cpu_malloc as m; print(m.keep_freed_memory(), m.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k not in cpu_malloc._ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    glibc = sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    assert out.split() == ([str(glibc)] * 2)
    env["MALLOC_TRIM_THRESHOLD_"] = str(1 << 20)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]

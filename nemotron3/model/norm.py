"""RMSNorm (block pre-norms, `norm_f`, MTP norms) and the grouped, gated RMSNorm of the Mamba-2 mixer.

Both normalise in fp32 and multiply by the weight in fp32 before casting back, as transformers'
`NemotronHRMSNorm` does (one rounding fewer than Llama's cast-then-multiply).
"""
import torch
from torch import nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


class GatedRMSNorm(nn.Module):
    """`norm(y * silu(z))` per group of `group_size` channels (Mamba-2 `norm_before_gate=False`).

    Mirrors transformers' `NemotronHRMSNormGated` / mamba_ssm `rmsnorm_fn(group_size=d_inner // n_groups)`.
    """

    def __init__(self, size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        v = y.float() * F.silu(z.float())
        g = v.unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(dtype)

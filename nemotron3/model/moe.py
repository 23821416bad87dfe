"""LatentMoE (`E` layers) and the dense relu^2 MLP (`-` layers and the shared expert).

Router (`gate`): fp32 logits, sigmoid scores; `e_score_correction_bias` is added only to choose experts
(DeepSeek-V3 group-limited top-k: `n_group` groups scored by the sum of their top-2, `topk_group` kept);
the weights come from the unbiased scores, renormalised when `norm_topk_prob`, times
`routed_scaling_factor`. Router and shared expert read the full width d; with `moe_latent_size` the
routed experts run in the latent width l between `fc1_latent_proj` (d -> l) and `fc2_latent_proj`
(l -> d). Experts are non-gated: down(relu(up(x))^2).

Routed expert weights live in one fused tensor per projection, `experts.up_proj` [E, I, l] and
`experts.down_proj` [E, l, I] (transformers' layout); checkpoint files hold them per expert and
`checkpoint.py` splits/stacks them. Compute sorts the (token, expert) pairs by expert and runs one
matmul per expert that received tokens: no Python loop over tokens, no dense [T, E] compute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronConfig


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


class MLP(nn.Module):
    """Non-gated squared-ReLU MLP: `down_proj(relu(up_proj(x))^2)`."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))


class TopkRouter(nn.Module):
    def __init__(self, config: NemotronConfig):
        super().__init__()
        c = config
        self.top_k, self.n_experts = c.num_experts_per_tok, c.n_routed_experts
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.norm_topk_prob, self.scale = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(c.n_routed_experts, c.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x [N, d] -> (scores [N, E] fp32 sigmoid, weights [N, k] fp32, indices [N, k])."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        w, idx = self.select(scores)
        return scores, w, idx

    def select(self, scores: torch.Tensor):
        """Sigmoid scores [N, E] fp32 -> (routing weights [N, k] fp32, expert indices [N, k])."""
        choice = scores.detach() + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)                 # [N, n_group]
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.n_experts)
        idx = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scale, idx


class Experts(nn.Module):
    linear_fn = None     # per-expert matmul; None = F.linear (NVFP4 training sets its fake-quant linear here)

    def __init__(self, config: NemotronConfig):
        super().__init__()
        c = config
        self.n_experts = c.n_routed_experts
        self.up_proj = nn.Parameter(torch.empty(c.n_routed_experts, c.moe_intermediate_size, c.moe_input_size))
        self.down_proj = nn.Parameter(torch.empty(c.n_routed_experts, c.moe_input_size, c.moe_intermediate_size))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, l], idx/w [N, k] -> sum_k w[:, k] * expert_idx[:, k](x), accumulated in fp32."""
        linear = self.linear_fn or F.linear
        return dispatch_experts(x, idx, w, self.n_experts,
                                lambda e, h: linear(relu2(linear(h, self.up_proj[e].to(h.dtype))),
                                                    self.down_proj[e].to(h.dtype)))


def dispatch_experts(x, idx, w, n_experts: int, expert) -> torch.Tensor:
    """Group the (token, expert) pairs by expert, run `expert(e, tokens)` once per expert that received
    tokens, and combine with the routing weights in fp32. Shared by the fp and the NVFP4 expert modules."""
    N, k = idx.shape
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    token = order // k
    xs = x.index_select(0, token)
    ws = w.reshape(-1).index_select(0, order)
    outs = [expert(e, chunk) for e, chunk in enumerate(xs.split(counts)) if counts[e]]
    ys = torch.cat(outs).float() * ws[:, None]
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, ys).to(x.dtype)


class LatentMoE(nn.Module):
    def __init__(self, config: NemotronConfig):
        super().__init__()
        c = config
        self.gate = TopkRouter(c)
        self.experts = Experts(c)
        # transformers sizes the shared expert by moe_shared_expert_intermediate_size alone (n_shared_experts
        # is 1 in every released config); we follow it so checkpoint shapes agree.
        self.shared_experts = MLP(c.hidden_size, c.moe_shared_expert_intermediate_size, bias=c.mlp_bias)
        if c.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(c.hidden_size, c.moe_latent_size, bias=c.mlp_bias)
            self.fc2_latent_proj = nn.Linear(c.moe_latent_size, c.hidden_size, bias=c.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        self.router_stats = None     # (scores, idx) of the last forward when `record_router` is on
        self.record_router = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores, w, idx = self.gate(flat)
        if self.record_router:
            self.router_stats = (scores, idx)
        h = flat if self.fc1_latent_proj is None else self.fc1_latent_proj(flat)
        h = self.experts(h, idx, w)
        if self.fc2_latent_proj is not None:
            h = self.fc2_latent_proj(h)
        return h.view(shape) + self.shared_experts(x)

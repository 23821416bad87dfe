"""Expert parallelism for training: each rank of an expert-parallel (EP) group holds E/ep of a LatentMoE's routed
experts, and tokens travel to their experts and back with two all-to-alls.

Design decisions:

* Wrapped from train/, the model is untouched: `shard_experts` swaps every `Experts` module for an `EPExperts`
  holding the rank's slice of the fused `[E, I, l]` / `[E, l, I]` tensors (split along E, rank r owns experts
  r*E/ep .. (r+1)*E/ep-1) under the same parameter names, so state-dict keys do not change; checkpoints see the
  slice as a DTensor `[Replicate (edp), Shard(0) (ep)]` over the 2-D mesh (state_dict in sharded.py).
* Routing stays where it was (router, top-k, bias, sequence aux loss all run on the rank's own tokens, so the
  aux-loss-free bias update from world-summed loads is unchanged and keeps routers identical on every rank).
  Dispatch reuses `moe.dispatch_experts`' sort-by-expert order, which is already ordered by destination rank:
  one all-to-all of the per-expert counts, one (autograd) `all_to_all_single` of the token rows, a local
  regroup by expert, one matmul per local expert, the inverse regroup, and a second all-to-all back; the
  routing weights are applied in fp32 on the token's own rank, exactly as in the single-process path.
* Every rank must call each MoE layer the same number of times (all-to-alls are collectives): true in training
  and in the trainer's evaluation, which runs on all ranks when the model is sharded.
* Gradients: a rank's expert slice receives the gradient of every EP peer's tokens; the data-parallel replicas
  of the slice (the `edp` group) are summed and the sum divided by the world size, matching the loss scaling
  (`TrainLoss` multiplies by world, data parallelism averages): `sync_expert_grads`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch import nn

from ..model.moe import Experts, relu2


class EPExperts(nn.Module):
    """The rank's slice of an `Experts` module; `forward(x, idx, w)` is collective over `group`."""

    def __init__(self, full: Experts, group, rank: int, size: int):
        super().__init__()
        E = full.n_experts
        self.n_experts, self.n_local, self.group, self.size = E, E // size, group, size
        lo = rank * self.n_local
        self.up_proj = nn.Parameter(full.up_proj.detach()[lo:lo + self.n_local].clone())
        self.down_proj = nn.Parameter(full.down_proj.detach()[lo:lo + self.n_local].clone())
        self.linear_fn = full.linear_fn

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        linear = self.linear_fn or torch.nn.functional.linear
        N, k = idx.shape
        ep, nl = self.size, self.n_local
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)                     # (token, expert) pairs by expert = by rank
        token = order // k
        counts = torch.bincount(flat, minlength=self.n_experts)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)  # recv[src * nl + j]: rows from src for expert j
        send_split = counts.view(ep, nl).sum(1).tolist()
        recv_split = recv.view(ep, nl).sum(1).tolist()
        xs = x.index_select(0, token)
        got = _all_to_all(xs, recv_split, send_split, self.group)
        labels = torch.arange(nl, device=x.device).repeat(ep).repeat_interleave(recv)
        perm = labels.argsort(stable=True)                    # rows by local expert, then by source rank
        per_expert = recv.view(ep, nl).sum(0).tolist()
        chunks = got.index_select(0, perm).split(per_expert)
        outs = [linear(relu2(linear(c, self.up_proj[j])), self.down_proj[j]) for j, c in enumerate(chunks) if len(c)]
        y = torch.cat(outs) if outs else got
        y = y.index_select(0, perm.argsort())                 # back to (source rank, expert) order
        back = _all_to_all(y, send_split, recv_split, self.group)
        ys = back.float() * w.reshape(-1).index_select(0, order)[:, None]
        out = torch.zeros(N, back.shape[1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, ys).to(x.dtype)


def _all_to_all(x: torch.Tensor, out_split: list, in_split: list, group) -> torch.Tensor:
    """Rows of `x` (split `in_split` over the group's ranks) exchanged; differentiable (the backward is the
    reverse exchange)."""
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_split, in_split, group))


def shard_experts(model: nn.Module, group, rank: int, size: int) -> dict[str, nn.Parameter]:
    """Swap every `Experts` in `model` for its EP slice; returns {parameter name: parameter} of the slices."""
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]
    if swaps and swaps[0][1].n_experts % size:
        raise ValueError(f"parallel.expert={size}: the model's {swaps[0][1].n_experts} routed experts are not "
                         f"divisible by the expert-parallel size")
    for name, m in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, EPExperts(m, group, rank, size))
    return {n: p for n, p in model.named_parameters() if isinstance(model.get_submodule(n.rpartition(".")[0]),
                                                                      EPExperts)}


@torch.no_grad()
def sync_expert_grads(params, edp_group, world: int) -> None:
    """Sum the expert slices' gradients over their data-parallel replicas, divide by the world size (see the
    module docstring); a slice whose experts got no token anywhere gets a zero gradient."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if dist.get_world_size(edp_group) > 1:
            dist.all_reduce(p.grad, group=edp_group)
        p.grad.div_(world)

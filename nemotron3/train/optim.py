"""The optimizer every trainer uses: AdamW with decoupled weight decay on matrices only, and the WSD schedule.

Design decisions: fp32 master weights and fp32 optimizer state (bf16 / nvfp4 only change the GEMMs); weight
decay on matrices (linears, experts, conv, lm_head), none on 1-D parameters (norms, biases, A_log, D, dt_bias)
or the input embedding; the learning rate is set on every group before each step (`set_lr`), so a schedule
is a plain function of the step and a resumed run needs no scheduler state.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with `weight_decay`, the rest (1-D params, input embedding) without; only
    parameters that require grad."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith("embeddings.weight") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, t: dict) -> torch.optim.AdamW:
    """AdamW over `param_groups` from a recipe section with lr, weight_decay, betas and eps."""
    return torch.optim.AdamW(param_groups(model, t["weight_decay"]), lr=t["lr"], betas=tuple(t["betas"]),
                             eps=t["eps"])


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def wsd_lr(step: int, t: dict) -> float:
    """LR of optimizer step `step` (0-based): warmup (step+1)/W, flat, then 1-sqrt decay to min_lr over the last
    decay_fraction of total_steps."""
    total, lr, lo = t["total_steps"], t["lr"], t["min_lr"]
    decay = max(1, round(t["decay_fraction"] * total))
    start = total - decay
    if step < t["warmup_steps"]:
        return lr * (step + 1) / t["warmup_steps"]
    if step < start:
        return lr
    return lo + (lr - lo) * (1 - math.sqrt(min(1.0, (step - start) / decay)))


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup to a constant `lr` (the post-training stages' schedule)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr

"""Data parallelism for the pretraining loop, behind one object: which rank this is, how the loss module is
wrapped, and how the per-step numbers are summed over ranks.

Design decisions:

* Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one process is
  world 1 and every collective is a no-op, so the loop has no single-process branch of its own.
* Plain data parallelism is torch DDP (NCCL on CUDA, gloo on CPU). Every parameter gets a gradient each step
  (experts are fused tensors, so an expert without tokens still sits in a used parameter) except the MTP
  block when mtp_depths = 0 (`find_unused`). Router-bias buffers are updated from all-reduced counts, so they
  need no per-forward broadcast.
* `parallel.fsdp` / `parallel.expert` (the recipe's `parallel` section) make the run `sharded`: `shard` applies
  FSDP2 and/or expert parallelism (sharded.py, expert_parallel.py) before the optimizer is built; with expert
  parallelism but no FSDP the non-expert weights stay under DDP (expert slices ignored by it). The loop only
  calls `wrap`, `accumulating`, `finish_grads` and `clip`; checkpoints of a sharded run go through DCP.
  FSDP on one process is the single-process path (nothing to shard).
* `threads` in a recipe is the machine's budget: split over the ranks of a node on CPU.
"""
from __future__ import annotations

import inspect
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Parallel:
    rank: int
    world: int
    device: torch.device
    fsdp: bool = False
    ep: int = 1
    mesh: object = None                                   # 2-D DeviceMesh (edp, ep) of a sharded run
    experts: dict = field(default_factory=dict)           # name -> this rank's expert-slice parameter
    root: nn.Module | None = None                         # the fully_shard root of an FSDP run

    @property
    def sharded(self) -> bool:
        return self.fsdp or self.ep > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    @classmethod
    def setup(cls, device: str, threads: int, fsdp: bool = False, expert: int = 1) -> "Parallel":
        """Join the process group (when launched with several ranks), pick this rank's device, set torch's
        thread count; `fsdp` / `expert` are the recipe's layout (checked against the world size here)."""
        rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
        if expert < 1 or world % expert:
            raise ValueError(f"parallel.expert={expert}: the world size ({world} ranks) must be a multiple of the "
                             "expert-parallel size")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"train.device {device!r}: no CUDA device available")
        if dev.type == "cuda":
            dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, threads // local_world if dev.type == "cpu" else threads))
        return cls(rank, world, dev, fsdp=fsdp and world > 1, ep=expert)

    def shard(self, model: nn.Module, bf16: bool) -> None:
        """Apply FSDP2 / expert parallelism to `model` in place (nothing for DDP or one process)."""
        if self.sharded:
            from .sharded import shard_model
            shard_model(model, self, bf16)
            self.root = model if self.fsdp else None

    def wrap(self, module: nn.Module, find_unused: bool) -> nn.Module:
        """The module the loop calls: DDP around `module` with several ranks, `module` itself otherwise."""
        if not self.on or self.fsdp:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.experts:
            DDP._set_params_and_buffers_to_ignore_for_model(module, [f"model.{n}" for n in self.experts])
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=find_unused, **sync)

    def accumulating(self, net: nn.Module, last: bool):
        """Context of one micro-batch's backward: gradients are synchronised on the step's last one only."""
        if self.fsdp:
            self.root.set_requires_gradient_sync(last)
            return nullcontext()
        return net.no_sync() if self.on and not last else nullcontext()

    def finish_grads(self) -> None:
        """After the step's last backward: reduce the expert slices' gradients (the rest is FSDP's / DDP's)."""
        if self.experts:
            from .expert_parallel import sync_expert_grads
            sync_expert_grads(self.experts.values(), self.mesh.get_group("edp"), self.world)

    def clip(self, model: nn.Module, params, max_norm: float) -> torch.Tensor:
        """Clip gradients to a global norm; returns the norm before clipping."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from .sharded import clip_grad_norm
        return clip_grad_norm(model, self, max_norm)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.on:
            dist.all_reduce(t, op=op)
        return t

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank."""
        if not self.on:
            return flag
        return bool(self.all_reduce(torch.tensor([float(flag)], device=self.device), dist.ReduceOp.MAX).item())

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def master_first(self, fn):
        """Run `fn` on rank 0, then on the other ranks (rank 0 builds shared files the others then read)."""
        if self.master:
            out = fn()
        self.barrier()
        if not self.master:
            out = fn()
        return out

"""Data parallelism for the pretraining loop, behind one object: which rank this is, how the loss module is
wrapped, and how the per-step numbers are summed over ranks.

Design decisions:

* Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one process is
  world 1 and every collective is a no-op, so the loop has no single-process branch of its own.
* Today the wrapper is torch DDP (NCCL on CUDA, gloo on CPU). Every parameter gets a gradient each step
  (experts are fused tensors, so an expert without tokens still sits in a used parameter) except the MTP
  block when mtp_depths = 0 (`find_unused`). Router-bias buffers are updated from all-reduced counts, so they
  need no per-forward broadcast. Sharded data parallelism or expert parallelism replaces `wrap` (and the
  checkpoint gathering in state.py), not the loop.
* `threads` in a recipe is the machine's budget: split over the ranks of a node on CPU.
"""
from __future__ import annotations

import inspect
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Parallel:
    rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    @classmethod
    def setup(cls, device: str, threads: int) -> "Parallel":
        """Join the process group (when launched with several ranks), pick this rank's device, set torch's
        thread count."""
        rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
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
        return cls(rank, world, dev)

    def wrap(self, module: nn.Module, find_unused: bool) -> nn.Module:
        """The module the loop calls: DDP around `module` with several ranks, `module` itself otherwise."""
        if not self.on:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=find_unused, **sync)

    def accumulating(self, net: nn.Module, last: bool):
        """Context of one micro-batch's backward: gradients are synchronised on the step's last one only."""
        return net.no_sync() if self.on and not last else nullcontext()

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

"""Sharded training state: FSDP2 over the non-expert weights, expert parallelism over the routed experts, and
their checkpoints through torch.distributed.checkpoint (DCP).

Design decisions:

* Layout (`shard_model`): a 2-D DeviceMesh (edp = world / ep, ep); the routed experts are split over `ep`
  (expert_parallel.py) and replicated over `edp`; everything else is `fully_shard`ed over all ranks, per
  backbone `Block`, then the root (embeddings, final norm, lm_head and the MTP block, whose layers run once per
  depth and so stay in the root's unit). The expert slices are `ignored_params` of FSDP: their gradients are
  reduced by `sync_expert_grads`. Mixed precision: bf16 parameters with fp32 reduction when the recipe's
  precision is bf16 on CUDA; fp32 on CPU (gloo has no bf16 reduce worth having, and CPU matmuls want fp32
  master copies anyway). `forward_mtp` is registered as an FSDP forward method, so the loss module calls it.
* Checkpoints (`save_sharded` / `load_sharded`): OUT_DIR/checkpoint/dcp holds one flat state dict, "model.NAME"
  and "optim.NAME.{exp_avg,exp_avg_sq,step}", written by every rank through DCP; FSDP parameters are DTensors
  already, expert slices are presented as DTensors over the 2-D mesh, so DCP records global shapes and a
  checkpoint loads into any world size or layout, or into one process (`no_dist`). config.json and trainer/
  (state.json, rng.safetensors) are written by rank 0 as in the single-process format; the directory is swapped
  in atomically by rank 0 after a barrier. `consolidate` rebuilds the full fp32 model from it in one process
  (what `state.export` uses), so OUT_DIR/model is an ordinary HF `nemotron_h` directory.
* Gradient clipping (`clip_grad_norm`): the global norm from each rank's local shards (FSDP shards summed
  over the world, expert slices summed over the world and divided by their edp replicas), torch's formula.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..config import NemotronConfig
from ..model import NemotronHForCausalLM


def is_sharded(ckpt: Path | None) -> bool:
    return ckpt is not None and (Path(ckpt) / "dcp" / ".metadata").exists()


def shard_model(model: NemotronHForCausalLM, par, bf16: bool) -> None:
    """Apply the layout of `par` (fsdp, ep) to `model` in place; records the expert slices in `par.experts`."""
    from torch.distributed.device_mesh import init_device_mesh
    par.mesh = init_device_mesh(par.device.type, (par.world // par.ep, par.ep), mesh_dim_names=("edp", "ep"))
    if par.ep > 1:
        from .expert_parallel import shard_experts
        par.experts = shard_experts(model, par.mesh.get_group("ep"), par.mesh.get_local_rank("ep"), par.ep)
    if not par.fsdp:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    world_mesh = init_device_mesh(par.device.type, (par.world,), mesh_dim_names=("dp",))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    ignored = set(par.experts.values())
    for block in model.backbone.layers:
        fully_shard(block, mesh=world_mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=world_mesh, mp_policy=mp, ignored_params=ignored)
    register_fsdp_forward_method(model, "forward_mtp")


@torch.no_grad()
def clip_grad_norm(model: nn.Module, par, max_norm: float) -> torch.Tensor:
    """Clip the gradients of a sharded model to a global norm `max_norm`; returns the norm before clipping."""
    expert_ids = {id(p) for p in par.experts.values()}
    sq, replicated = torch.zeros((), device=par.device), torch.zeros((), device=par.device)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grads.append(g)
        s = g.float().pow(2).sum()
        if isinstance(p.grad, DTensor):
            sq += s
        elif id(p) in expert_ids:
            sq += s / (par.world // par.ep)
        else:
            replicated += s
    if par.on:
        dist.all_reduce(sq)
    norm = (sq + replicated).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


def _expert_dtensor(t: torch.Tensor, par):
    return DTensor.from_local(t, par.mesh, [Replicate(), Shard(0)], run_check=False)


def _state_dict(model: nn.Module, opt, par, keys=None) -> dict:
    """The flat DCP state dict of `model` and `opt` (see the module docstring); with `keys` (a checkpoint's),
    missing optimizer states are created as zeros to be loaded into, and only `keys` are kept."""
    experts = set(par.experts) if par is not None else set()
    sd = {}
    for name, t in model.state_dict().items():
        sd[f"model.{name}"] = _expert_dtensor(t, par) if name in experts else t
    for name, p in model.named_parameters():
        if keys is not None and f"optim.{name}.exp_avg" in keys and not opt.state.get(p):
            opt.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
        for k, v in opt.state.get(p, {}).items():
            sd[f"optim.{name}.{k}"] = _expert_dtensor(v, par) if name in experts and v.ndim else v
    if keys is not None:
        sd = {k: v for k, v in sd.items() if k in keys or k.startswith("model.")}
    return sd


def save_sharded(out_dir: Path, model, opt, par, trainer_files) -> Path:
    """Collective: write OUT_DIR/checkpoint (DCP state + config + trainer files by rank 0) atomically."""
    import shutil
    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    if par.master:
        shutil.rmtree(tmp, ignore_errors=True)
    par.barrier()
    dcp.save(_state_dict(model, opt, par), checkpoint_id=str(tmp / "dcp"))
    if par.master:
        model.config.save(tmp)
        trainer_files(tmp)
    par.barrier()
    if par.master:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    par.barrier()
    return final


def load_sharded(ckpt: Path, model, opt, par) -> None:
    """Load a DCP checkpoint into `model` and `opt` in place, whatever layout either was saved or is run with
    (`par.sharded` False: one process or DDP ranks each read the full tensors)."""
    sharded = par is not None and par.sharded
    keys = set(dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata)
    sd = _state_dict(model, opt, par if sharded else None, keys)
    dcp.load(sd, checkpoint_id=str(ckpt / "dcp"), no_dist=not sharded)


def config_of(ckpt: Path) -> NemotronConfig:
    return NemotronConfig.from_json_file(Path(ckpt))


def consolidate(ckpt: Path) -> NemotronHForCausalLM:
    """The full fp32 model of a sharded checkpoint, in this process."""
    model = NemotronHForCausalLM(config_of(ckpt), init=False)
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    with warnings.catch_warnings():          # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(Path(ckpt) / "dcp"), no_dist=True)
    return model

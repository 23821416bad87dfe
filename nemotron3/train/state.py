"""A run's state on disk, shared by every trainer: OUT_DIR/checkpoint (atomic, resumable), OUT_DIR/model (the
exported inference model), OUT_DIR/log.jsonl + recipe.json (`RunLog`), and the RNG seeding they rely on.

Design decisions:

* Checkpoints are safetensors + JSON only (never pickle): the fp32 model (config.json + model.safetensors,
  loadable by `nemotron3.load`) and trainer/ with optimizer.safetensors ({param}.exp_avg / .exp_avg_sq /
  .step, keyed by parameter name, so a checkpoint does not depend on parameter order), rng.safetensors (torch
  CPU and CUDA, numpy, Python) and state.json (the trainer's own counters + param groups). Written to
  checkpoint.tmp/, then swapped in by renames; checkpoint.old only survives a crash mid-swap.
* Resume is exact because every trainer's batches are a pure function of (seed, step) and the RNGs are
  restored, so `--resume` replays the uninterrupted run; `RunLog` drops the log records written after the
  checkpoint, which the resumed run writes again.
* Only the process that owns the files (rank 0) writes them; `RunLog(enabled=False)` on the others.
* A sharded run (FSDP2 / expert parallelism, `par.sharded`) keeps the same directory and trainer/ files, but its
  model and optimizer tensors live in checkpoint/dcp (torch.distributed.checkpoint, written by every rank:
  sharded.py); `load_checkpoint` and `export` read either format, so a sharded checkpoint resumes on any world
  size or in one process and exports the same HF directory.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .. import checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's `random` (a checkpoint restores all three)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _rng_tensors() -> tuple[dict, dict]:
    t = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"torch_cuda_{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    t["numpy_keys"] = torch.from_numpy(keys.astype("<u4").view(np.uint8).copy())
    v, state, g = random.getstate()
    return t, {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "python": [v, list(state), g]}


def _set_rng(t: dict, j: dict) -> None:
    torch.set_rng_state(t["torch_cpu"])
    cuda = [t[k] for k in sorted(k for k in t if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    name, pos, has_gauss, gauss = j["numpy"]
    np.random.set_state((name, t["numpy_keys"].numpy().view("<u4"), pos, has_gauss, gauss))
    v, state, g = j["python"]
    random.setstate((v, tuple(state), g))


def save_checkpoint(out_dir: Path, model, opt, state: dict, par=None) -> Path:
    """Write out_dir/checkpoint/ (model, optimizer, RNGs, `state`) atomically; returns its path. With a sharded
    `par` this is collective (every rank calls it), otherwise rank 0's alone."""
    if par is not None and par.sharded:
        from .sharded import save_sharded
        return save_sharded(out_dir, model, opt, par, lambda tmp: _trainer_files(tmp, opt, state))
    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save(model, tmp, dtype=torch.float32)
    (tmp / "trainer").mkdir()
    opt_t = {}
    for name, p in model.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            opt_t[f"{name}.{k}"] = v.detach().reshape(v.shape or (1,)).contiguous().cpu()
    save_file(opt_t, str(tmp / "trainer" / "optimizer.safetensors"))
    _trainer_files(tmp, opt, state)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _trainer_files(tmp: Path, opt, state: dict) -> None:
    """trainer/rng.safetensors and trainer/state.json (the optimizer's hyperparameters ride along)."""
    (tmp / "trainer").mkdir(exist_ok=True)
    rng_t, rng_j = _rng_tensors()
    save_file(rng_t, str(tmp / "trainer" / "rng.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    (tmp / "trainer" / "state.json").write_text(json.dumps({**state, "rng": rng_j, "param_groups": groups}, indent=1))


def find_checkpoint(out_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):      # .old only survives a crash mid-swap
        if (out_dir / name / "trainer" / "state.json").exists():
            return out_dir / name
    return None


def resumable_checkpoint(out_dir: Path, resume: bool, verbose: bool = True) -> Path | None:
    """The checkpoint to continue from: None for a fresh run; an existing checkpoint without `resume` is a
    FileExistsError (a run is never silently overwritten)."""
    ckpt = find_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or choose another --out-dir")
    if resume and ckpt is None and verbose:
        print(f"--resume: no checkpoint in {out_dir}, starting from scratch", file=sys.stderr)
    return ckpt


def load_checkpoint(path: Path, model, opt, state: dict, par=None) -> dict:
    """Restore optimizer and RNG state into `opt` (model weights are loaded by `checkpoint.load`; those of a
    sharded checkpoint here, into `model` as `par` lays it out) and the saved values of `state`'s keys into
    `state`; returns `state`."""
    from .sharded import is_sharded, load_sharded
    saved = json.loads((path / "trainer" / "state.json").read_text())
    if is_sharded(path):
        load_sharded(path, model, opt, par)
        _set_rng(checkpoint.load_safetensors(path / "trainer" / "rng.safetensors"), saved["rng"])
        state.update({k: v for k, v in saved.items() if k in state})
        return state
    tensors = checkpoint.load_safetensors(path / "trainer" / "optimizer.safetensors")
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    sd["state"] = {}
    for name, p in model.named_parameters():
        if f"{name}.exp_avg" in tensors:
            sd["state"][index[id(p)]] = {"step": tensors[f"{name}.step"].reshape(()),
                                         "exp_avg": tensors[f"{name}.exp_avg"],
                                         "exp_avg_sq": tensors[f"{name}.exp_avg_sq"]}
    opt.load_state_dict(sd)
    _set_rng(checkpoint.load_safetensors(path / "trainer" / "rng.safetensors"), saved["rng"])
    state.update({k: v for k, v in saved.items() if k in state})
    return state


def export(out_dir: Path, tokenizer_dir=None, dtype: str = "bfloat16") -> Path:
    """OUT_DIR/checkpoint -> OUT_DIR/model: config.json + model.safetensors (`dtype`) + tokenizer files,
    loadable with `nemotron3.load`."""
    from .sharded import consolidate, is_sharded
    model_dir, ckpt = Path(out_dir) / "model", Path(out_dir) / "checkpoint"
    model = consolidate(ckpt) if is_sharded(ckpt) else checkpoint.load(ckpt, dtype=torch.float32)
    checkpoint.save(model, model_dir, dtype=dtype)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, model_dir)
    return model_dir


def copy_tokenizer(src, dst) -> None:
    """Copy the tokenizer files present in `src` into `dst`."""
    for f in TOKENIZER_FILES:
        if (Path(src) / f).exists():
            shutil.copyfile(Path(src) / f, Path(dst) / f)


class RunLog:
    """OUT_DIR/log.jsonl, one JSON record a line, each stamped with the run's current `state["step"]`.

    Opening it writes OUT_DIR/recipe.json (the resolved recipe) and empties the log of a fresh run; a resumed
    run keeps the records up to its checkpoint's `state["step"]`. `enabled=False` (ranks other than 0) makes
    every call a no-op."""

    def __init__(self, out_dir: Path, recipe: dict, state: dict, resumed: bool, enabled: bool = True):
        self.path, self.state, self.enabled = Path(out_dir) / "log.jsonl", state, enabled
        if not enabled:
            return
        keep = []
        if resumed and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= state["step"]]
        self.path.write_text("".join(ln + "\n" for ln in keep))
        (Path(out_dir) / "recipe.json").write_text(json.dumps(recipe, indent=1))

    def __call__(self, rec: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": self.state["step"], **rec}) + "\n")

"""Pretraining: `python -m nemotron3.train RECIPE.json [--resume] [--max-steps N] ...` (or under torchrun).

The loop of every stage that trains on packed text (pretraining, long-context, SFT); its parts live beside it:
recipe.py (the recipe), data.py (batches), loss.py (LM + MTP + MoE balancing), optim.py (AdamW, WSD),
parallel.py (ranks, DDP; FSDP2 and expert parallelism in sharded.py / expert_parallel.py), state.py (checkpoints,
resume, export, log.jsonl).

Design decisions (sources: /work/shared/reference/recipes.md §1-3):

* fp32 master weights and fp32 gradients (the shared lm_head's gradient is accumulated in fp32 even
  under bf16 autocast: autocast's weight cache is off, so each use casts separately and the grads
  meet in the fp32 .grad).
* precision: fp32; bf16 (autocast, fp32 master weights); auto = bf16 where the hardware has native bf16
  matmuls (CUDA with bf16, CPUs with AVX512_BF16 or AMX: 1.4-1.6x faster pico steps, bench/train_speed.py)
  and fp32 elsewhere (without them bf16 is emulated, ~20x slower); nvfp4 = NVIDIA's NVFP4 pretraining recipe emulated
  (quant/training.py: fake-quantized GEMMs, 16x16 weight tiles, 1x16 activations, stochastic rounding and a
  16-point RHT in backward) on the Mamba, shared/routed-expert and dense-MLP linears; attention projections,
  latent projections, routers, embeddings, lm_head, MTP and the last nvfp4_hp_last_fraction (15%) of layers
  stay in high precision (fp32 here; BF16 in NVIDIA's run). Stochastic rounding draws from torch's global RNG,
  which checkpoints save, so an nvfp4 resume is exact too; checkpoints stay ordinary fp32 checkpoints.
* Batches are a pure function of the step index (data.py) and checkpoints hold every RNG, so `--resume`
  replays the uninterrupted run exactly. SIGINT/SIGTERM finish the step, checkpoint and exit.
* Every eval step logs the validation loss and the in-context copying probe (eval/lm.induction_score).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import checkpoint
from ..eval.lm import IGNORE, induction_score
from ..model import NemotronHForCausalLM
from .data import prepare_data
from .loss import TrainLoss
from .optim import adamw, set_lr, wsd_lr
from .parallel import Parallel
from .recipe import PRETRAIN, load_recipe, model_config, run_stage, stage_overrides, stage_parser, train_stage
from .sharded import config_of, is_sharded
from .state import RunLog, export, load_checkpoint, resumable_checkpoint, save_checkpoint, seed_everything


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (not emulated) on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16", "nvfp4"):
        raise ValueError(f"precision must be fp32, bf16, nvfp4 or auto, got {precision!r}")
    return precision


@torch.no_grad()
def add_embedding_mean(model, std: float) -> None:
    """From-scratch init option `train.init_embedding_mean`: add one shared random vector (per-element std
    `std`) to every embedding row. Why: the Mamba output gate `silu(z)` is a linear function of the normed
    input; with zero-mean random embeddings it is a random sign per (token, channel), which scrambles the
    previous-token features an in-context-copying head needs (NoPE attention gets position only from the
    Mamba layers). A shared component gives every channel a token-independent part of its gate. On the copy
    task of bench/copy_init.py (d 64, init 0.1) 0.1 made the gated hybrid copy at ~800 steps instead of
    ~2,530. Drawn from the trainer's seeded RNG, so runs stay reproducible."""
    if std:
        w = model.backbone.embeddings.weight
        w.add_(std * torch.randn(w.shape[1], dtype=w.dtype).to(w.device))


def build_model(recipe: dict, ckpt: Path | None, device: torch.device):
    """The model to train: the checkpoint's, `init`'s (continued training: long context, SFT) or a fresh one;
    with precision nvfp4 its GEMMs are swapped before the optimizer and DDP see the modules (parameters are
    kept). Returns (model, nvfp4 plan or None)."""
    t = recipe["train"]
    if is_sharded(ckpt):               # weights are loaded once the model is laid out (load_checkpoint)
        model = NemotronHForCausalLM(config_of(ckpt), init=False).to(device).train()
    elif ckpt is not None or recipe.get("init"):
        model = checkpoint.load(ckpt or recipe["init"], dtype=torch.float32, device=device).train()
    else:
        model = NemotronHForCausalLM(model_config(recipe)).to(device).train()
        add_embedding_mean(model, t["init_embedding_mean"])
    if t["precision"] != "nvfp4":
        return model, None
    from ..quant.training import apply_nvfp4_training
    return model, apply_nvfp4_training(model, t["nvfp4_hp_last_fraction"])


class _Stop:
    """SIGINT/SIGTERM: finish the current step, save, exit. Another signal more than 3 s later interrupts
    at once (torchrun forwards the terminal's Ctrl-C, so workers see it twice in quick succession)."""

    def __init__(self):
        self.flag, self.when = False, 0.0
        self.old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, sig, frame):
        if self.flag:
            if time.monotonic() - self.when > 3:
                raise KeyboardInterrupt
            return
        self.flag, self.when = True, time.monotonic()
        print(f"\n[signal {sig}] finishing this step, saving a checkpoint, then exiting", file=sys.stderr)

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)


def val_batches(n_val: int, rank: int, world: int, batch_size: int, collective: bool):
    """This rank's validation batches: (row indices, how many of them count). Rows rank, rank + world, ...
    of the first n_val; when the forward is collective (a sharded model all-gathers weights in it) every rank
    runs the same number of forwards, a rank short of rows repeating row 0 without counting it."""
    mine = np.arange(rank, n_val, world)
    n = -(-n_val // world) if collective else len(mine)
    for i in range(0, n, batch_size):
        idx = mine[i:i + batch_size]
        want = min(batch_size, n - i)
        yield np.concatenate([idx, np.zeros(want - len(idx), dtype=idx.dtype)]), len(idx)


class Pretrainer:
    """One run's live objects (model, loss, optimizer, data, ranks) and its two operations: `step` (one
    optimizer step over grad_accum micro-batches) and `evaluate` (validation loss, copying probe)."""

    def __init__(self, model, t: dict, par: Parallel, train_ds, val_ds):
        self.model, self.t, self.par, self.train_ds, self.val_ds = model, t, par, train_ds, val_ds
        self.n_params = model.num_parameters()
        par.shard(model, bf16=t["precision"] == "bf16" and par.device.type == "cuda")
        self.opt = adamw(model, t)
        self.lossm = TrainLoss(model, t)
        self.net = par.wrap(self.lossm, find_unused=model.mtp is not None and self.lossm.depths == 0)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = (lambda: torch.autocast(par.device.type, dtype=torch.bfloat16, cache_enabled=False)) \
            if t["precision"] == "bf16" else nullcontext
        # eval_batches global batches, the same rows for any world size
        self.n_val = min(len(val_ds), t["eval_batches"] * t["batch_size"] * par.world)

    def step(self, step: int) -> tuple[dict, int]:
        """Optimizer step `step` (0-based); returns its log record's losses, lr, grad norm and expert load, and
        the number of tokens it trained on (all ranks)."""
        t, par, A, D = self.t, self.par, self.t["grad_accum"], self.lossm.depths
        micro = [self.train_ds.batch(step * A + j, par.rank, par.world) for j in range(A)]
        norm = par.all_reduce(self.lossm.norms([y for _, y in micro]).to(par.device))
        self.lossm.record(True)
        stats = torch.zeros(D + 2, device=par.device)
        for j, (x, y) in enumerate(micro):
            with par.accumulating(self.net, last=j == A - 1):
                with self.autocast():
                    loss, terms = self.net(x.to(par.device), y.to(par.device), norm, par.world)
                loss.backward()
            stats += terms
        self.lossm.record(False)
        par.finish_grads()
        gnorm = par.clip(self.model, self.params, t["grad_clip"])
        lr = wsd_lr(step, t)
        set_lr(self.opt, lr)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        load = self.lossm.update_bias(t["bias_update_rate"], par.on)
        terms = par.all_reduce(stats).tolist()
        rec = {"loss": self.lossm.combine(terms), "lm_loss": terms[0], "mtp_loss": terms[1:1 + D],
               "aux_loss": terms[-1], "lr": lr, "grad_norm": gnorm.item(), "expert_load": load}
        return rec, sum(x.numel() for x, _ in micro) * par.world

    @torch.no_grad()
    def val_loss(self) -> float:
        self.lossm.record(False)
        par, B = self.par, self.t["batch_size"]
        tot = torch.zeros(2, dtype=torch.float64, device=par.device)
        for idx, keep in val_batches(self.n_val, par.rank, par.world, B, par.sharded):
            x, y = (v.to(par.device) for v in self.val_ds.rows(idx))
            with self.autocast():
                logits = self.model(x)[:keep]
            y = y[:keep]
            tot[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                                      reduction="sum").double()
            tot[1] += (y != IGNORE).sum()
        par.all_reduce(tot)
        return (tot[0] / tot[1].clamp(min=1)).item()

    def evaluate(self) -> dict:
        """{"val_loss"} on every rank, plus "copy_gain" (in-context copying: ~0 until an induction head forms)
        on rank 0 (computed on every rank of a sharded model: its forward is collective)."""
        out = {"val_loss": self.val_loss()}
        if self.par.master or self.par.sharded:
            cfg = self.model.config
            with self.autocast():
                out["copy_gain"] = induction_score(self.model, cfg.vocab_size, n=16, batch_size=self.t["batch_size"],
                                                   bos_id=cfg.bos_token_id)["copy_gain"]
        if not self.par.master:
            out.pop("copy_gain", None)
        return out


def _banner(run: Pretrainer, nvfp4_plan) -> None:
    t, ds, par = run.t, run.train_ds, run.par
    shapes = " + ".join(f"{w} x ({b} x {c.seq_len})" for c, b, w in ds.components)
    layout = " x ".join(x for x in ("FSDP2" if par.fsdp else "", f"EP {par.ep}" if par.ep > 1 else "") if x)
    print(f"model {run.n_params / 1e6:.2f}M params | {par.world} rank(s){f' ({layout})' if layout else ''} x {t['grad_accum']} accum x "
          f"[{shapes}] per {len(ds.cycle)} steps | {t['precision']} on {par.device} | "
          f"{len(ds)} train rows, {ds.steps_per_epoch(par.world) // t['grad_accum']} steps/epoch", file=sys.stderr)
    if nvfp4_plan is not None:
        hp = sorted({v for v in nvfp4_plan.values() if v != "nvfp4"})
        print(f"nvfp4: {sum(v == 'nvfp4' for v in nvfp4_plan.values())} of {len(nvfp4_plan)} linears/expert "
              f"blocks in NVFP4; high precision: {', '.join(hp)}", file=sys.stderr)


def debiased_ema(xs, beta: float = 0.95) -> list[float]:
    """Exponential moving average with the start-up bias divided out (nanochat's smoothed loss)."""
    out, sm = [], 0.0
    for i, x in enumerate(xs):
        sm = beta * sm + (1 - beta) * x
        out.append(sm / (1 - beta ** (i + 1)))
    return out


def plot(log_path: Path, png: Path) -> None:
    """Train LM loss (raw and debiased EMA, as in nanochat), val loss and LR over steps."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["lm_loss"]) for r in recs if "lm_loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if tr:
        s, lm = map(np.array, zip(*tr))
        ax.plot(s, lm, alpha=0.25, label="train LM loss")
        ax.plot(s, debiased_ema(lm), label="train LM loss (EMA)")
    if va:
        ax.plot(*zip(*va), "o-", label="val LM loss")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.plot([r["step"] for r in recs if "lr" in r], [r["lr"] for r in recs if "lr" in r])
    ax2.set_ylabel("lr")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(png.with_suffix(".tmp.png"), png)


def train(recipe: dict, resume: bool = False, max_steps: int | None = None, progress: bool = True) -> dict:
    """Run (or resume) the recipe's training up to `max_steps` (default: all of train.total_steps); the last step
    exports OUT_DIR/model. Returns {"step", "val_loss", "stopped"}."""
    t = recipe["train"]
    t["precision"] = resolve_precision(t["precision"], torch.device(t["device"]))
    p = recipe["parallel"]
    par = Parallel.setup(t["device"], t["threads"], fsdp=p["fsdp"], expert=p["expert"])
    out_dir = Path(recipe["out_dir"])
    ckpt = resumable_checkpoint(out_dir, resume, verbose=par.master)
    if par.sharded and ckpt is not None and not is_sharded(ckpt):
        raise ValueError(f"{ckpt} is a single-process / DDP checkpoint: resume it without parallel.fsdp / "
                         "parallel.expert (sharded runs write DCP checkpoints, which resume in any layout)")
    seed_everything(t["seed"])
    model, nvfp4_plan = build_model(recipe, ckpt, par.device)
    if par.master:
        out_dir.mkdir(parents=True, exist_ok=True)
    run = Pretrainer(model, t, par, *par.master_first(lambda: prepare_data(recipe, model.config.vocab_size)))
    state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    if ckpt is not None:
        load_checkpoint(ckpt, model, run.opt, state, par)
        if par.master:
            print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
    log = RunLog(out_dir, recipe, state, resumed=ckpt is not None, enabled=par.master)
    if par.master:
        _banner(run, nvfp4_plan)
    end = t["total_steps"] if max_steps is None else min(max_steps, t["total_steps"])
    stop, bar = _Stop(), None
    if par.master and progress:
        from tqdm import tqdm
        bar = tqdm(total=t["total_steps"], initial=state["step"], unit="step", dynamic_ncols=True, smoothing=0.1)
    try:
        val = _loop(run, state, log, end, stop, bar, recipe)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        par.barrier()
    return {"step": state["step"], "val_loss": val, "stopped": stop.flag}


def _loop(run: Pretrainer, state: dict, log: RunLog, end: int, stop: _Stop, bar, recipe: dict):
    """Steps from state["step"] to `end`: log, evaluate, checkpoint (every save_every, at the end, on a signal),
    export after the schedule's last step. Returns the last validation loss (None if none was taken)."""
    t, par, out_dir, val = run.t, run.par, Path(recipe["out_dir"]), None
    while state["step"] < end:
        t0 = time.perf_counter()
        rec, n_tokens = run.step(state["step"])
        stop.flag = par.any(stop.flag)
        step, dt = state["step"] + 1, time.perf_counter() - t0
        state.update(step=step, tokens=state["tokens"] + n_tokens, elapsed=state["elapsed"] + dt,
                     data_position=step * t["grad_accum"])   # next micro-batch index for data.batch()
        rec.update(tokens=state["tokens"], tok_per_s=round(n_tokens / dt, 1), time=round(state["elapsed"], 2))
        evaluating = step % t["eval_every"] == 0 or step == t["total_steps"]
        if evaluating:
            rec.update(run.evaluate())
            val = rec["val_loss"]
        if step % t["log_every"] == 0 or evaluating:
            log(rec)
        if bar is not None:
            bar.set_postfix_str(f"loss {rec['lm_loss']:.3f} lr {rec['lr']:.2e} {rec['tok_per_s']:,.0f} tok/s"
                                + (f" val {val:.3f}" if val is not None else ""), refresh=False)
            bar.update(1)
        if par.master and evaluating:
            plot(log.path, out_dir / "loss.png")
            msg = (f"step {step}/{t['total_steps']} | lm {rec['lm_loss']:.4f} | val {val:.4f} | "
                   f"copy gain {rec['copy_gain']:.2f} | lr {rec['lr']:.2e} | "
                   f"{state['tokens'] / max(state['elapsed'], 1e-9):,.0f} tok/s avg | {state['elapsed'] / 60:.1f} min")
            bar.write(msg) if bar is not None else print(msg, file=sys.stderr, flush=True)
        if stop.flag or step % t["save_every"] == 0 or step == end:
            if par.master or par.sharded:
                save_checkpoint(out_dir, run.model, run.opt, state, par)
            if stop.flag:
                break
    if par.master and state["step"] >= t["total_steps"]:
        print(f"exported {export(out_dir, recipe['data']['tokenizer_dir'])}", file=sys.stderr)
    return val


def main(argv=None, prog: str = "python -m nemotron3.train"):
    ap = stage_parser(prog, __doc__)
    ap.add_argument("--precision", choices=["fp32", "bf16", "nvfp4", "auto"])
    ap.add_argument("--device", help="cpu (default) or cuda")
    ap.add_argument("--export", action="store_true", help="only export OUT_DIR/checkpoint to OUT_DIR/model (bf16)")
    a = ap.parse_args(argv)
    over = {k: v for k, v in (("train.precision", a.precision), ("train.device", a.device)) if v}
    if a.export:
        recipe = run_stage(ap, lambda: load_recipe(a.recipe, {**stage_overrides(a), **over}))
        print(export(Path(recipe["out_dir"]), recipe["data"]["tokenizer_dir"]))
        return
    try:
        train_stage(ap, a, PRETRAIN, train, overrides=over)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

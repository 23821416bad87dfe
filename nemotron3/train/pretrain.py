"""Pretraining: `python -m nemotron3.train RECIPE.json [--resume] [--max-steps N] ...` (or under torchrun).

Design decisions (sources: /work/shared/reference/recipes.md §1-3):

* Loss = LM cross-entropy + mtp_loss_factor / D * sum_k CE_k + moe_aux_loss_coeff * seq-aux loss. Every
  term is a token (or sequence) SUM divided by the count over the whole global step (all micro-batches,
  all ranks), so gradient accumulation and DDP give the same gradients as one big batch.
* MTP depth k: logits at position t predict token t+k+1, so the target is labels[t+k]; it is -100 when
  any of labels[t..t+k] is -100, i.e. when the chain t -> t+k+1 crosses a document boundary.
* MoE balancing (DeepSeek-V3 / Megatron): a per-sequence aux loss sum_i f_i P_i (f_i = E/(k T) * tokens
  routed to i, P_i = mean of scores normalised over experts), averaged over sequences and MoE calls
  (the shared MTP MoE counts once per depth), plus aux-loss-free balancing: after every optimizer step
  e_score_correction_bias += rate * sign(mean_load - load_i) from the step's globally summed counts.
  Router outputs are captured with forward hooks, so every call of a layer is seen.
* fp32 master weights and fp32 gradients (the shared lm_head's gradient is accumulated in fp32 even
  under bf16 autocast: autocast's weight cache is off, so each use casts separately and the grads
  meet in the fp32 .grad). Logits are fp32; the losses are computed in fp32.
* WSD schedule: linear warmup, constant, 1-sqrt decay to min_lr over the last decay_fraction of steps.
* precision: fp32; bf16 (autocast, fp32 master weights); auto = bf16 where the hardware has native bf16
  matmuls (CUDA with bf16, CPUs with AVX512_BF16 or AMX: 1.4-1.6x faster pico steps, bench/train_speed.py)
  and fp32 elsewhere (without them bf16 is emulated, ~20x slower); nvfp4 = NVIDIA's NVFP4 pretraining recipe emulated
  (quant/training.py: fake-quantized GEMMs, 16x16 weight tiles, 1x16 activations, stochastic rounding and a
  16-point RHT in backward) on the Mamba, shared/routed-expert and dense-MLP linears; attention projections,
  latent projections, routers, embeddings, lm_head, MTP and the last nvfp4_hp_last_fraction (15%) of layers
  stay in high precision (fp32 here; BF16 in NVIDIA's run). Stochastic rounding draws from torch's global RNG,
  which checkpoints save, so an nvfp4 resume is exact too; checkpoints stay ordinary fp32 checkpoints.
* Checkpoints are safetensors + JSON only (never pickle), written to a temp dir and renamed; batches
  are a pure function of the step index (data.py), so `--resume` replays the uninterrupted run exactly.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .. import checkpoint
from ..config import NemotronConfig
from ..model import NemotronHForCausalLM
from ..model.moe import LatentMoE

IGNORE = -100
TRAIN_DEFAULTS = dict(
    batch_size=8, grad_accum=1, lr=3e-3, min_lr=3e-5, warmup_steps=50, total_steps=1000, decay_fraction=0.2,
    weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, grad_clip=1.0, mtp_depths=2, mtp_loss_factor=0.3,
    moe_aux_loss_coeff=1e-4, bias_update_rate=1e-3, eval_every=100, eval_batches=8, save_every=250,
    seed=1337, threads=2, precision="fp32", device="cpu", log_every=1, nvfp4_hp_last_fraction=0.15,
    init_embedding_mean=0.0)
DATA_DEFAULTS = dict(corpus_dir="runs/data/corpus", tokenizer_dir="runs/data/tokenizer", seq_len=512,
                     sources=None)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


# ----------------------------------------------------------------------------------------------------
# recipe
# ----------------------------------------------------------------------------------------------------

def load_recipe(path, overrides: dict | None = None) -> dict:
    """Recipe JSON -> {model, data, train, out_dir, ...} with defaults (other top-level keys, e.g. `init` or a
    stage's own section, are kept); `overrides` maps "train.lr" -> value."""
    r = json.loads(Path(path).read_text()) if path is not None else {}
    r = {**r, "model": dict(r.get("model", {})), "data": {**DATA_DEFAULTS, **r.get("data", {})},
         "train": {**TRAIN_DEFAULTS, **r.get("train", {})}, "out_dir": r.get("out_dir", "runs/out")}
    return apply_overrides(r, overrides)


def apply_overrides(recipe: dict, overrides: dict | None) -> dict:
    """Set dotted keys in place ("train.lr" -> recipe["train"]["lr"]; a number indexes a list, so
    "data.mix.1.weight" is the second mixture component's weight); returns the recipe. Every stage's
    `load_recipe` applies `--set` with this. A path that does not exist is a ValueError naming it."""
    for key, value in (overrides or {}).items():
        d, parts = recipe, key.split(".")
        for i, part in enumerate(parts):
            if isinstance(d, list):
                if not (part.isdigit() and int(part) < len(d)):
                    raise ValueError(f"--set {key}: {'.'.join(parts[:i]) or 'recipe'} is a list of {len(d)}; "
                                     f"{part!r} is not an index into it")
                part = int(part)
            elif not isinstance(d, dict) or (i < len(parts) - 1 and part not in d):
                raise ValueError(f"--set {key}: the recipe has no {'.'.join(parts[:i + 1])!r}")
            if i == len(parts) - 1:
                d[part] = value
            else:
                d = d[part]
    return recipe


def model_config(recipe: dict) -> NemotronConfig:
    """`model` holds NemotronConfig fields (with `pattern`) or config.json keys (`hybrid_override_pattern`)."""
    m = recipe["model"]
    return NemotronConfig(**m) if "pattern" in m else NemotronConfig.from_dict(m)


def wsd_lr(step: int, t: dict) -> float:
    """LR of optimizer step `step` (0-based): warmup (step+1)/W, flat, then 1-sqrt decay to min_lr."""
    total, lr, lo = t["total_steps"], t["lr"], t["min_lr"]
    decay = max(1, round(t["decay_fraction"] * total))
    start = total - decay
    if step < t["warmup_steps"]:
        return lr * (step + 1) / t["warmup_steps"]
    if step < start:
        return lr
    return lo + (lr - lo) * (1 - math.sqrt(min(1.0, (step - start) / decay)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linears, experts, conv, lm_head); none on 1-D params (norms, biases,
    A_log, D, dt_bias) or the input embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith("embeddings.weight") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------

def mtp_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Depth-k targets [B, T-k]: labels[t+k], -100 where any of labels[t..t+k] is -100."""
    T = labels.shape[1]
    out = labels[:, k:].clone()
    for j in range(k):
        out[labels[:, j:T - k + j] == IGNORE] = IGNORE
    return out


def seq_aux_loss(scores: torch.Tensor, idx: torch.Tensor, B: int):
    """DeepSeek-V3 sequence-wise balance loss per sequence [B] and routed-token counts [E] of one MoE call."""
    E, k = scores.shape[-1], idx.shape[-1]
    s = scores.view(B, -1, E)
    T = s.shape[1]
    P = (s / s.sum(-1, keepdim=True)).mean(1)                                           # [B, E]
    counts = torch.zeros(B, E, device=s.device).scatter_add_(
        1, idx.view(B, -1), torch.ones(B, T * k, device=s.device))                       # [B, E]
    return (counts * (E / (k * T)) * P).sum(-1), counts.sum(0)


class TrainLoss(nn.Module):
    """Model + losses in one forward, so DDP sees a single call. Returns (loss to backprop, stats [2+D])
    where stats = [lm, mtp_1..mtp_D, aux] as shares of the global-step means."""

    def __init__(self, model: NemotronHForCausalLM, t: dict):
        super().__init__()
        self.model, self.depths = model, t["mtp_depths"] if model.mtp is not None else 0
        self.mtp_factor, self.aux_coeff = t["mtp_loss_factor"], t["moe_aux_loss_coeff"]
        self.moes = [(n.replace("backbone.", "").replace(".mixer", ""), m)
                     for n, m in model.named_modules() if isinstance(m, LatentMoE)]
        self.calls: list = []
        self._active = False
        self.counts = {id(m): torch.zeros(m.gate.n_experts, device=model.device) for _, m in self.moes}
        for _, m in self.moes:
            m.register_forward_hook(self._hook)

    def _hook(self, mod, inputs, out):
        if self._active and mod.record_router:
            self.calls.append((mod, inputs[0].shape[0], *mod.router_stats))

    def record(self, on: bool):
        for _, m in self.moes:
            m.record_router = on

    def forward(self, ids, labels, norm: torch.Tensor, world: int):
        """norm = global [n_lm, n_mtp_1..n_mtp_D, n_moe_sequences] of this optimizer step."""
        self.calls.clear()
        self._active = True
        try:
            main, mtps = self.model.forward_mtp(ids, self.depths)
        finally:
            self._active = False
            for _, m in self.moes:
                m.router_stats = None
        V = main.shape[-1]
        terms = [F.cross_entropy(main.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")]
        for k, logits in enumerate(mtps, 1):
            terms.append(F.cross_entropy(logits.reshape(-1, V), mtp_labels(labels, k).reshape(-1),
                                         ignore_index=IGNORE, reduction="sum"))
        aux = main.new_zeros(())
        for mod, B, scores, idx in self.calls:
            per_seq, counts = seq_aux_loss(scores, idx, B)
            aux = aux + per_seq.sum()
            self.counts[id(mod)] += counts.detach()
        self.calls.clear()
        terms = torch.stack(terms + [aux]) / norm.clamp(min=1)
        D = len(mtps)
        loss = terms[0] + (self.mtp_factor / D * terms[1:1 + D].sum() if D else 0) + self.aux_coeff * terms[-1]
        return loss * world, terms.detach()

    @torch.no_grad()
    def update_bias(self, rate: float, dist_on: bool) -> dict:
        """Aux-loss-free balancing from the step's (all-reduced) counts; returns per-layer load stats."""
        stats = {}
        for name, m in self.moes:
            c = self.counts[id(m)]
            if dist_on:
                dist.all_reduce(c)
            mean = c.mean()
            if rate:
                m.gate.e_score_correction_bias += rate * torch.sign(mean - c).to(m.gate.e_score_correction_bias)
            if mean > 0:
                stats[name] = {"max": round((c.max() / mean).item(), 4), "min": round((c.min() / mean).item(), 4),
                               "cv": round((c.std(unbiased=False) / mean).item(), 4)}
            c.zero_()
        return stats


# ----------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON only)
# ----------------------------------------------------------------------------------------------------

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


def save_checkpoint(out_dir: Path, model, opt, state: dict) -> Path:
    """out_dir/checkpoint/: the fp32 model (config.json + model.safetensors, loadable by `nemotron3.load`)
    and trainer/ with optimizer.safetensors ({param}.exp_avg / .exp_avg_sq / .step), rng.safetensors and
    state.json. Written to checkpoint.tmp/, then swapped in by renames."""
    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save(model, tmp, dtype=torch.float32)
    (tmp / "trainer").mkdir()
    opt_t = {}
    for name, p in model.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            opt_t[f"{name}.{k}"] = v.detach().reshape(v.shape or (1,)).contiguous().cpu()
    save_file(opt_t, str(tmp / "trainer" / "optimizer.safetensors"))
    rng_t, rng_j = _rng_tensors()
    save_file(rng_t, str(tmp / "trainer" / "rng.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    (tmp / "trainer" / "state.json").write_text(json.dumps({**state, "rng": rng_j, "param_groups": groups}, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):      # .old only survives a crash mid-swap
        if (out_dir / name / "trainer" / "state.json").exists():
            return out_dir / name
    return None


def load_checkpoint(path: Path, model, opt) -> dict:
    """Restore optimizer and RNG state into `opt` (model weights are loaded by `checkpoint.load`)."""
    tensors = checkpoint.load_safetensors(path / "trainer" / "optimizer.safetensors")
    state = json.loads((path / "trainer" / "state.json").read_text())
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    sd["state"] = {}
    for name, p in model.named_parameters():
        if f"{name}.exp_avg" in tensors:
            sd["state"][index[id(p)]] = {"step": tensors[f"{name}.step"].reshape(()),
                                         "exp_avg": tensors[f"{name}.exp_avg"],
                                         "exp_avg_sq": tensors[f"{name}.exp_avg_sq"]}
    opt.load_state_dict(sd)
    _set_rng(checkpoint.load_safetensors(path / "trainer" / "rng.safetensors"), state["rng"])
    return state


def export(ckpt_dir, model_dir, dtype="bfloat16", tokenizer_dir=None) -> Path:
    """Checkpoint -> inference model dir: config.json + model.safetensors (bf16) + tokenizer files,
    loadable with `nemotron3.load(model_dir)`."""
    model_dir = Path(model_dir)
    model = checkpoint.load(ckpt_dir, dtype=torch.float32)
    checkpoint.save(model, model_dir, dtype=dtype)
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copyfile(Path(tokenizer_dir) / f, model_dir / f)
    return model_dir


# ----------------------------------------------------------------------------------------------------
# data, logging
# ----------------------------------------------------------------------------------------------------

def _component(spec: dict, corpus: Path, tok, seed: int, shuffle: bool):
    """One PackedDataset from a data spec: source "corpus" (the recipe's corpus dir) or another corpus dir
    (both read `split`, default train), a documents `.jsonl`, a token stream `.npy` (optionally with a
    `mask` `.npy` of the same length: 1 = learn this token), or "copy": `rows` rows of the in-context copying
    curriculum cut from the corpus (`data.copy_task_stream`; spans drawn with the spec's `seed`, default the
    training seed; `"spans": "random"` draws the copied spans uniformly from the non-special ids, or from the
    `span_vocab` lowest of them: the most frequent BPE tokens, whose embeddings the text trains; `span_len`
    and `filler_len` are [lo, hi) ranges).
    `"pack": false` (documents only) gives every document a row of its own (cut to seq_len, padded, pad
    targets masked), so a document that must be seen whole (a retrieval document whose questions come at its
    end) never straddles two rows."""
    from .corpus import iter_documents
    from .data import PackedDataset, copy_task_stream, load_tokens
    src, T = spec.get("source", "corpus"), spec["seq_len"]
    if src == "copy":
        if not isinstance(spec.get("rows"), int) or spec["rows"] < 1:
            raise ValueError(f"a 'copy' data component needs \"rows\": a positive integer, got {spec.get('rows')!r}")
        spans = spec.get("spans", "text")
        if spans not in ("text", "random"):
            raise ValueError(f"a 'copy' component's \"spans\" must be 'text' or 'random', got {spans!r}")
        n_ids = spec.get("span_vocab", tok.vocab_size)
        if not isinstance(n_ids, int) or isinstance(n_ids, bool) or n_ids < 2:
            raise ValueError(f"a 'copy' component's \"span_vocab\" must be an integer >= 2, got {n_ids!r}")
        lo = max(tok.special_ids) + 1              # "span_vocab": N draws from the N lowest non-special ids
        span_ids = (lo, min(tok.vocab_size, lo + n_ids)) if spans == "random" else None
        lengths = {k: spec[k] for k in ("span_len", "filler_len") if k in spec}
        tokens, mask = copy_task_stream(load_tokens(corpus, tok), spec["rows"], T, spec.get("seed", seed), span_ids,
                                        **lengths)
        return PackedDataset(tokens, T, tok.eos_id, seed=seed, shuffle=shuffle, loss_mask=mask)
    is_docs = src == "corpus" or Path(src).is_dir() or str(src).endswith(".jsonl")
    if is_docs and spec.get("pack", True) is False:
        path = Path(corpus if src == "corpus" else src)
        path = path / f"{spec.get('split', 'train')}.jsonl" if path.is_dir() else path
        docs = tok.encode_batch([d["text"] for d in iter_documents(path)], parse_special=False)
        tokens = np.full(len(docs) * T + 1, tok.pad_id, dtype=np.int32)
        mask = np.zeros(len(tokens), dtype=np.uint8)
        for i, ids in enumerate(docs):
            ids = ids[:T - 1] + [tok.eos_id]
            tokens[i * T:i * T + len(ids)] = ids
            mask[i * T + 1:i * T + len(ids)] = 1
        return PackedDataset(tokens, T, tok.eos_id, seed=seed, shuffle=shuffle, loss_mask=mask)
    if is_docs:
        tokens = load_tokens(corpus if src == "corpus" else src, tok, spec.get("split", "train"))
    elif str(src).endswith(".npy"):
        tokens = np.load(src, allow_pickle=False)
    else:
        raise ValueError(f"data source must be 'corpus', 'copy', a corpus dir, a .jsonl or a .npy file, got {src!r}")
    mask = np.load(spec["mask"], allow_pickle=False) if spec.get("mask") else None
    return PackedDataset(tokens, T, tok.eos_id, seed=seed, shuffle=shuffle, loss_mask=mask)


def prepare_data(recipe: dict, vocab_size: int):
    """Build the corpus and train the tokenizer when missing; returns (train Mixture, val PackedDataset).
    Without `data.mix` the mixture is the corpus train split alone (rows of seq_len, train.batch_size);
    `data.mix` lists components {source, seq_len, batch_size, weight[, split, mask]}; `data.val` is a spec
    like a component's (default: the corpus val split at seq_len)."""
    from .corpus import build_corpus, iter_documents, stdlib_root
    from .data import Mixture
    from ..tokenizer import load_tokenizer, train_tokenizer
    d, seed = recipe["data"], recipe["train"]["seed"]
    corpus, tok_dir = Path(d["corpus_dir"]), Path(d["tokenizer_dir"])
    if not (corpus / "train.jsonl").exists():     # "stdlib/NAME" sources: a file or package of the stdlib
        sources = None if d["sources"] is None else [
            str(stdlib_root() / s[len("stdlib/"):]) if s.startswith("stdlib/") else s for s in d["sources"]]
        build_corpus(corpus, sources=sources)
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer((doc["text"] for doc in iter_documents(corpus)), vocab_size, tok_dir)
    tok = load_tokenizer(tok_dir)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer vocab {tok.vocab_size} > model vocab_size {vocab_size}")
    mix = d.get("mix") or [{"source": "corpus", "seq_len": d["seq_len"], "batch_size": recipe["train"]["batch_size"]}]
    train = Mixture([(_component(c, corpus, tok, seed, True), c.get("batch_size", recipe["train"]["batch_size"]),
                      c.get("weight", 1)) for c in mix])
    val = _component({"source": "corpus", "split": "val", "seq_len": d["seq_len"], **(d.get("val") or {})},
                     corpus, tok, seed, False)
    return train, val


def plot(log_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["lm_loss"]) for r in recs if "lm_loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if tr:
        s, lm = map(np.array, zip(*tr))
        ema, sm = [], 0.0
        for i, x in enumerate(lm):                  # debiased EMA, as in nanochat
            sm = 0.95 * sm + 0.05 * x
            ema.append(sm / (1 - 0.95 ** (i + 1)))
        ax.plot(s, lm, alpha=0.25, label="train LM loss")
        ax.plot(s, ema, label="train LM loss (EMA)")
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


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------

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


def train(recipe: dict, resume: bool = False, max_steps: int | None = None, progress: bool = True) -> dict:
    from ..eval.lm import induction_score
    t, d = recipe["train"], recipe["data"]
    t["precision"] = resolve_precision(t["precision"], torch.device(t["device"]))
    rank, world, local = (int(os.environ.get(k, dflt)) for k, dflt in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    ddp = world > 1
    device = torch.device(t["device"])
    if device.type == "cuda":
        device = torch.device("cuda", local if ddp else (device.index or 0))
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # `threads` is the machine's budget: split it over the ranks of this node
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, t["threads"] // local_world if device.type == "cpu" else t["threads"]))
    master = rank == 0
    out_dir = Path(recipe["out_dir"])
    ckpt = find_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or choose another --out-dir")
    if resume and ckpt is None and master:
        print(f"--resume: no checkpoint in {out_dir}, starting from scratch", file=sys.stderr)

    torch.manual_seed(t["seed"])
    random.seed(t["seed"])
    np.random.seed(t["seed"])
    if ckpt is not None:
        model = checkpoint.load(ckpt, dtype=torch.float32, device=device).train()
    elif recipe.get("init"):              # continued training (long-context stage, SFT) from a model dir
        model = checkpoint.load(recipe["init"], dtype=torch.float32, device=device).train()
    else:
        model = NemotronHForCausalLM(model_config(recipe)).to(device).train()
        add_embedding_mean(model, t["init_embedding_mean"])
    cfg = model.config
    nvfp4_plan = None
    if t["precision"] == "nvfp4":     # swap before the optimizer / DDP see the modules; parameters are kept
        from ..quant.training import apply_nvfp4_training
        nvfp4_plan = apply_nvfp4_training(model, t["nvfp4_hp_last_fraction"])
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        train_ds, val_ds = prepare_data(recipe, cfg.vocab_size)
    if ddp:
        dist.barrier()
    if not master:
        train_ds, val_ds = prepare_data(recipe, cfg.vocab_size)

    opt = torch.optim.AdamW(param_groups(model, t["weight_decay"]), lr=t["lr"], betas=tuple(t["betas"]),
                            eps=t["eps"])
    state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    if ckpt is not None:
        state = {k: v for k, v in load_checkpoint(ckpt, model, opt).items() if k in ("step", "tokens", "elapsed")}
        if master:
            print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
    lossm = TrainLoss(model, t)
    net = lossm
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Every parameter gets a gradient each step (experts are fused tensors, so an expert without tokens
        # still sits in a used parameter) except the MTP block when mtp_depths = 0. Router-bias buffers are
        # updated from all-reduced counts, so they need no per-forward broadcast.
        unused = model.mtp is not None and lossm.depths == 0
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        net = DDP(lossm, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=unused, **sync)
    B, A, D = t["batch_size"], t["grad_accum"], lossm.depths
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)) \
        if t["precision"] == "bf16" else nullcontext
    n_moe_calls = cfg.pattern.count("E") + D * cfg.mtp_pattern.count("E")   # the MTP MoE runs once per depth

    log_path, png = out_dir / "log.jsonl", out_dir / "loss.png"
    if master:
        keep = []
        if ckpt is not None and log_path.exists():   # drop records written after the checkpoint
            keep = [ln for ln in log_path.read_text().splitlines() if ln.strip() and
                    json.loads(ln).get("step", 0) <= state["step"]]
        log_path.write_text("".join(ln + "\n" for ln in keep))
        (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=1))
        shapes = " + ".join(f"{w} x ({b} x {ds.seq_len})" for ds, b, w in train_ds.components)
        print(f"model {model.num_parameters() / 1e6:.2f}M params | {world} rank(s) x {A} accum x [{shapes}] per "
              f"{len(train_ds.cycle)} steps | {t['precision']} on {device} | "
              f"{len(train_ds)} train rows, {train_ds.steps_per_epoch(world) // A} steps/epoch", file=sys.stderr)
        if nvfp4_plan is not None:
            hp = sorted({v for v in nvfp4_plan.values() if v != "nvfp4"})
            print(f"nvfp4: {sum(v == 'nvfp4' for v in nvfp4_plan.values())} of {len(nvfp4_plan)} linears/expert "
                  f"blocks in NVFP4; high precision: {', '.join(hp)}", file=sys.stderr)

    def log(rec):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    n_val = min(len(val_ds), t["eval_batches"] * B * world)   # eval_batches global batches, same for any world

    @torch.no_grad()
    def evaluate() -> float:
        lossm.record(False)
        tot = torch.zeros(2, dtype=torch.float64, device=device)
        mine = np.arange(rank, n_val, world)
        for i in range(0, len(mine), B):
            x, y = (v.to(device) for v in val_ds.rows(mine[i:i + B]))
            with autocast():
                logits = model(x)
            tot[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                                      reduction="sum").double()
            tot[1] += (y != IGNORE).sum()
        if ddp:
            dist.all_reduce(tot)
        return (tot[0] / tot[1].clamp(min=1)).item()

    stop = _Stop()
    end = t["total_steps"] if max_steps is None else min(max_steps, t["total_steps"])
    bar = None
    if master and progress:
        from tqdm import tqdm
        bar = tqdm(total=t["total_steps"], initial=state["step"], unit="step", dynamic_ncols=True, smoothing=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    step, val = state["step"], None
    try:
        while step < end:
            t0 = time.perf_counter()
            micro = [train_ds.batch(step * A + j, rank, world) for j in range(A)]
            step_tokens = sum(x.numel() for x, _ in micro) * world
            norm = torch.zeros(D + 2, device=device)
            for _, y in micro:
                norm[0] += (y != IGNORE).sum()
                for k in range(1, D + 1):
                    norm[k] += (mtp_labels(y, k) != IGNORE).sum()
            norm[-1] = sum(x.shape[0] for x, _ in micro) * n_moe_calls
            if ddp:
                dist.all_reduce(norm)
            lossm.record(True)
            stats = torch.zeros(D + 2, device=device)
            for j, (x, y) in enumerate(micro):
                sync = nullcontext() if not ddp or j == A - 1 else net.no_sync()
                with sync:
                    with autocast():
                        loss, terms = net(x.to(device), y.to(device), norm, world)
                    loss.backward()
                stats += terms
            lossm.record(False)
            gnorm = torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
            lr = wsd_lr(step, t)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            load = lossm.update_bias(t["bias_update_rate"], ddp)
            if ddp:
                dist.all_reduce(stats)
                flag = torch.tensor([float(stop.flag)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop.flag = bool(flag.item())
            step += 1
            dt = time.perf_counter() - t0
            state.update(step=step, tokens=state["tokens"] + step_tokens, elapsed=state["elapsed"] + dt,
                         data_position=step * A)   # next micro-batch index for data.batch()
            lm, mtp, aux = stats[0].item(), stats[1:1 + D].tolist(), stats[-1].item()
            total = lm + (t["mtp_loss_factor"] / D * sum(mtp) if D else 0) + t["moe_aux_loss_coeff"] * aux
            rec = {"step": step, "loss": total, "lm_loss": lm, "mtp_loss": mtp, "aux_loss": aux, "lr": lr,
                   "tokens": state["tokens"], "tok_per_s": round(step_tokens / dt, 1), "grad_norm": gnorm.item(),
                   "time": round(state["elapsed"], 2), "expert_load": load}
            evaluating = step % t["eval_every"] == 0 or step == t["total_steps"]
            if evaluating:
                val = rec["val_loss"] = evaluate()
                if master:                  # in-context copying (eval/lm.py): ~0 until an induction head forms
                    with autocast():
                        rec["copy_gain"] = induction_score(model, cfg.vocab_size, n=16, batch_size=B,
                                                           bos_id=cfg.bos_token_id)["copy_gain"]
            if step % t["log_every"] == 0 or evaluating:
                log(rec)
            if bar is not None:
                bar.set_postfix_str(f"loss {lm:.3f} lr {lr:.2e} {step_tokens / dt:,.0f} tok/s"
                                    + (f" val {val:.3f}" if val is not None else ""), refresh=False)
                bar.update(1)
            if master and evaluating:
                plot(log_path, png)
                msg = (f"step {step}/{t['total_steps']} | lm {lm:.4f} | val {val:.4f} | "
                       f"copy gain {rec['copy_gain']:.2f} | lr {lr:.2e} | "
                       f"{state['tokens'] / max(state['elapsed'], 1e-9):,.0f} tok/s avg | {state['elapsed'] / 60:.1f} min")
                bar.write(msg) if bar is not None else print(msg, file=sys.stderr, flush=True)
            if stop.flag or step % t["save_every"] == 0 or step == end:
                if master:
                    save_checkpoint(out_dir, model, opt, state)
                if stop.flag:
                    break
        if master and step >= t["total_steps"]:
            export(out_dir / "checkpoint", out_dir / "model", "bfloat16", d["tokenizer_dir"])
            print(f"exported {out_dir / 'model'}", file=sys.stderr)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if ddp:
            dist.barrier()
    return {"step": step, "val_loss": val, "stopped": stop.flag}


def parse_overrides(pairs) -> dict:
    """`--set KEY=VALUE` pairs -> {KEY: JSON value (or the raw string when it is not JSON)}."""
    over = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return over


def stage_parser(prog: str, doc: str, progress: bool = True) -> argparse.ArgumentParser:
    """The arguments every training stage's CLI shares: RECIPE, --out-dir, --resume, --max-steps, --set
    (and --no-progress where the stage shows a progress bar)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    ap.add_argument("recipe", help="recipe JSON")
    ap.add_argument("--out-dir")
    ap.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    ap.add_argument("--max-steps", type=int, help="stop (and checkpoint) after this many steps; the schedule "
                    "still spans the recipe's step count")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a recipe value, e.g. --set train.total_steps=3000")
    if progress:
        ap.add_argument("--no-progress", action="store_true")
    return ap


def run_stage(ap: argparse.ArgumentParser, fn):
    """Run a stage CLI's work; a user mistake (missing recipe or model, bad recipe value, existing checkpoint
    without --resume, unsupported setting) exits with status 2 and one `error:` line, as argparse does."""
    try:
        return fn()
    except (FileNotFoundError, FileExistsError, NotImplementedError, ValueError) as e:
        ap.exit(2, f"error: {e}\n")


def stage_overrides(a: argparse.Namespace) -> dict:
    """`--set` pairs plus `--out-dir` as recipe overrides."""
    over = parse_overrides(a.set)
    if a.out_dir:
        over["out_dir"] = a.out_dir
    return over


def main(argv=None):
    ap = stage_parser("python -m nemotron3.train", __doc__)
    ap.add_argument("--precision", choices=["fp32", "bf16", "nvfp4", "auto"])
    ap.add_argument("--device", help="cpu (default) or cuda")
    ap.add_argument("--export", action="store_true", help="only export OUT_DIR/checkpoint to OUT_DIR/model (bf16)")
    a = ap.parse_args(argv)
    over = stage_overrides(a)
    if a.precision:
        over["train.precision"] = a.precision
    if a.device:
        over["train.device"] = a.device
    recipe = run_stage(ap, lambda: load_recipe(a.recipe, over))
    if recipe["train"]["device"] == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    if a.export:
        out = Path(recipe["out_dir"])
        print(export(out / "checkpoint", out / "model", "bfloat16", recipe["data"]["tokenizer_dir"]))
        return
    try:
        run_stage(ap, lambda: train(recipe, resume=a.resume, max_steps=a.max_steps, progress=not a.no_progress))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

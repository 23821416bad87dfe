"""Recall ablation: hybrid Mamba-2 + attention vs pure Mamba-2 on multi-query associative recall (MQAR).

`python bench/recall_ablation.py --minutes 9 --json runs/ablation/recall.json`

Tests the Nemotron 3 claim that pure state-space layers are worse at precise recall over long contexts and
that a few attention layers fix it, with a controlled from-scratch experiment on MQAR (Zoology, Arora et
al. 2023) using our own model code (`NemotronHForCausalLM`).

Data (generated on the fly from a seeded torch.Generator; a batch is a pure function of (seed, step)):
vocabulary 512 = [0, 8) unused specials | [8, 64) noise | [64, 288) keys | [288, 512) values.
A sequence of length T with N pairs = a context region of T - 2N tokens holding the N key-value pairs
(k v, adjacent, distinct keys, values drawn with replacement) at random positions, noise tokens in between,
then N queries `k v` (every key once, in a random order). Labels (aligned with the inputs, as `labels[t]` =
the target for the logits at t) are the value at each query key's position and -100 elsewhere, so the loss
and the accuracy only count "what was the value paired with this key". With longer T and the same N the
pairs are spread over the whole length, so the recall distance grows with T.

Arms: same width/depth, `M-*-M-` (1 attention mixer out of 3) vs `M-M-M-` (the `*` replaced by `M`).
Both train on the same batches for the same number of steps (fixed from a throughput calibration of the
slower arm when --steps is not given), AdamW + warmup + cosine, grad clip 1.0, weight decay on matrices.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nemotron3.config import NemotronConfig  # noqa: E402
from nemotron3.model import NemotronHForCausalLM  # noqa: E402
from nemotron3.train.optim import param_groups  # noqa: E402

IGNORE = -100
VOCAB = 512
NOISE = (8, 64)
KEYS = (64, 288)
VALUES = (288, 512)


# ---------------------------------------------------------------------------------------------- data
def make_sequence(T: int, n_pairs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One MQAR sequence: ids [T], labels [T] (value ids at query-key positions, -100 elsewhere)."""
    N = n_pairs
    if 4 * N > T:
        raise ValueError(f"{N} pairs + {N} queries need {4 * N} tokens > T={T}")
    if N > KEYS[1] - KEYS[0]:
        raise ValueError(f"at most {KEYS[1] - KEYS[0]} distinct keys")
    keys = KEYS[0] + torch.randperm(KEYS[1] - KEYS[0], generator=gen)[:N]
    vals = torch.randint(VALUES[0], VALUES[1], (N,), generator=gen)
    C = T - 2 * N                                   # context region; queries fill the last 2N tokens
    n_noise = C - 2 * N
    ids = torch.randint(NOISE[0], NOISE[1], (T,), generator=gen)
    # choose N "pair units" among n_noise + N units (each pair unit is 2 tokens wide), keep their order
    units = torch.randperm(n_noise + N, generator=gen)[:N].sort().values
    starts = units + torch.arange(N)                # each earlier pair adds one extra token
    ids[starts] = keys
    ids[starts + 1] = vals
    perm = torch.randperm(N, generator=gen)
    qpos = C + 2 * torch.arange(N)
    ids[qpos] = keys[perm]
    ids[qpos + 1] = vals[perm]
    labels = torch.full((T,), IGNORE, dtype=torch.long)
    labels[qpos] = vals[perm]
    return ids, labels


def make_batch(B: int, T: int, n_pairs, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """B sequences; n_pairs is an int or an inclusive (lo, hi) range drawn per sequence."""
    ids, labels = [], []
    for _ in range(B):
        if isinstance(n_pairs, int):
            n = n_pairs
        else:
            n = int(torch.randint(n_pairs[0], n_pairs[1] + 1, (1,), generator=gen))
        i, l = make_sequence(T, n, gen)
        ids.append(i)
        labels.append(l)
    return torch.stack(ids), torch.stack(labels)


def set_vocab(n_keys: int = 224, n_values: int = 224) -> None:
    """Use n_keys key ids from 64 and n_values value ids right after them (both default to the full split)."""
    global KEYS, VALUES
    if 64 + n_keys + n_values > VOCAB:
        raise ValueError("keys + values do not fit in the vocabulary")
    KEYS = (64, 64 + n_keys)
    VALUES = (64 + n_keys, 64 + n_keys + n_values)


def batch_gen(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# -------------------------------------------------------------------------------------------- models
ARCH = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=256, mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16, n_groups=1,
            chunk_size=64, num_nextn_predict_layers=0, max_position_embeddings=16384,
            tie_word_embeddings=False)


def arm_configs(hybrid: str = "M-*-M-", **overrides) -> dict[str, NemotronConfig]:
    """{arm name: config}; the pure-SSM arm is the hybrid pattern with every `*` replaced by `M`."""
    arch = {**ARCH, **overrides}
    return {"hybrid": NemotronConfig(pattern=hybrid, **arch),
            "pure-ssm": NemotronConfig(pattern=hybrid.replace("*", "M"), **arch)}


def build_model(cfg: NemotronConfig, seed: int) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    return NemotronHForCausalLM(cfg)


# ----------------------------------------------------------------------------------------- training
def lr_at(step: int, total: int, lr: float, warmup: int, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))


def loss_and_acc(model, ids, labels):
    logits = model(ids)
    mask = labels != IGNORE
    sel = logits[mask]
    loss = F.cross_entropy(sel, labels[mask])
    acc = (sel.argmax(-1) == labels[mask]).float().mean()
    return loss, acc


def make_optimizer(model, lr, weight_decay):
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_arm(model, steps: int, *, seed: int, batch: int, T: int, pairs, lr: float, warmup: int,
              min_lr: float, weight_decay: float = 0.1, log_every: int = 0, name: str = "",
              curve: list | None = None) -> dict:
    opt = make_optimizer(model, lr, weight_decay)
    model.train()
    t0 = time.perf_counter()
    ema_loss = ema_acc = None
    for step in range(steps):
        ids, labels = make_batch(batch, T, pairs, batch_gen(seed, step))
        cur = lr_at(step, steps, lr, warmup, min_lr)
        for g in opt.param_groups:
            g["lr"] = cur
        loss, acc = loss_and_acc(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        l, a = loss.item(), acc.item()
        if not math.isfinite(l):
            raise FloatingPointError(f"{name}: non-finite loss at step {step}")
        ema_loss = l if ema_loss is None else 0.9 * ema_loss + 0.1 * l
        ema_acc = a if ema_acc is None else 0.9 * ema_acc + 0.1 * a
        if curve is not None:
            curve.append({"step": step, "loss": l, "acc": a})
        if log_every and (step % log_every == 0 or step == steps - 1):
            el = time.perf_counter() - t0
            print(f"  [{name}] step {step:5d}/{steps} loss {l:.4f} (ema {ema_loss:.4f}) acc(ema) {ema_acc:.3f} "
                  f"lr {cur:.2e} {el / 60:.1f} min", flush=True)
    return {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss_ema": ema_loss,
            "final_acc_ema": ema_acc, "tokens": steps * batch * T}


@torch.inference_mode()
def evaluate(model, T: int, N: int, n_seqs: int, seed: int, batch: int = 8) -> float:
    """Greedy accuracy at the value positions on fresh sequences (same sequences for every arm)."""
    model.eval()
    gen = torch.Generator().manual_seed(10_000_019 * (seed + 1) + 7919 * T + N)
    correct = total = 0
    done = 0
    while done < n_seqs:
        b = min(batch, n_seqs - done)
        ids, labels = make_batch(b, T, N, gen)
        logits = model(ids)
        mask = labels != IGNORE
        correct += int((logits[mask].argmax(-1) == labels[mask]).sum())
        total += int(mask.sum())
        done += b
    model.train()
    return correct / total


def time_steps(model, n: int, *, batch, T, pairs, seed) -> float:
    """Seconds per training step (median of n, after one warm-up step); the model is thrown away."""
    opt = make_optimizer(model, 1e-3, 0.1)
    ts = []
    for s in range(n + 1):
        ids, labels = make_batch(batch, T, pairs, batch_gen(seed + 99, s))
        t0 = time.perf_counter()
        loss, _ = loss_and_acc(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t0)
    ts = sorted(ts[1:])
    return ts[len(ts) // 2]


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="M-*-M-", help="hybrid pattern; the pure arm replaces * by M")
    ap.add_argument("--ssm-state", type=int, default=16)
    ap.add_argument("--init-range", type=float, default=0.1,
                    help="initializer_range (std of the normal init); at 0.02 learning is much slower here")
    ap.add_argument("--steps", type=int, default=0, help="training steps per arm (0: from --minutes)")
    ap.add_argument("--minutes", type=float, default=9.0, help="wall budget per arm (slower arm) when --steps=0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-len", type=int, default=64)
    ap.add_argument("--pairs", type=int, nargs=2, default=[4, 8], metavar=("LO", "HI"))
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="3e-3 and above never left chance level here, for either arm")
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of steps")
    ap.add_argument("--eval-lens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--eval-pairs", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--eval-tokens", type=int, default=65536, help="tokens per eval cell (>= 2 sequences)")
    ap.add_argument("--n-keys", type=int, default=128, help="distinct key ids (values: --n-values)")
    ap.add_argument("--n-values", type=int, default=128)
    ap.add_argument("--arms", nargs="+", default=["hybrid", "pure-ssm"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    set_vocab(args.n_keys, args.n_values)
    cfgs = arm_configs(args.pattern, ssm_state_size=args.ssm_state, initializer_range=args.init_range)
    cfgs = {k: v for k, v in cfgs.items() if k in args.arms}
    pairs = tuple(args.pairs)
    params = {k: build_model(c, args.seed).num_parameters() for k, c in cfgs.items()}
    for k, c in cfgs.items():
        print(f"{k:9s} pattern {c.pattern!r:10s} params {params[k]:,}")

    steps = args.steps
    calib = {}
    if steps <= 0:
        for k, c in cfgs.items():
            calib[k] = time_steps(build_model(c, args.seed + 1), 3, batch=args.batch, T=args.train_len,
                                  pairs=pairs, seed=args.seed)
            print(f"calibration {k}: {calib[k]:.3f} s/step, "
                  f"{args.batch * args.train_len / calib[k]:,.0f} train tok/s", flush=True)
        steps = max(10, int(args.minutes * 60 / max(calib.values())))
    warmup = max(1, int(args.warmup * steps))
    print(f"steps {steps} per arm, batch {args.batch} x {args.train_len}, pairs {pairs}, lr {args.lr}, "
          f"warmup {warmup}, cosine to {args.min_lr}", flush=True)

    results = {"args": vars(args), "steps": steps, "calibration_s_per_step": calib, "arms": {}}
    log_every = max(1, steps // 25)
    for k, c in cfgs.items():
        print(f"== train {k} ({c.pattern})", flush=True)
        model = build_model(c, args.seed)
        curve = []
        stats = train_arm(model, steps, seed=args.seed, batch=args.batch, T=args.train_len, pairs=pairs,
                          lr=args.lr, warmup=warmup, min_lr=args.min_lr, log_every=log_every, name=k,
                          curve=curve)
        evals = {}
        t0 = time.perf_counter()
        for T in args.eval_lens:
            for N in args.eval_pairs:
                if 4 * N > T:
                    continue
                n = max(2, args.eval_tokens // T)
                acc = evaluate(model, T, N, n, args.seed, batch=max(1, min(16, 16384 // T)))
                evals[f"{T}/{N}"] = acc
                print(f"  [{k}] eval T={T:6d} N={N:4d} ({n} seqs): acc {acc:.3f}", flush=True)
        stats["eval_seconds"] = time.perf_counter() - t0
        results["arms"][k] = {"pattern": c.pattern, "params": params[k], **stats, "eval": evals,
                              "curve": curve[:: max(1, steps // 200)]}

    # table
    arms = list(results["arms"])
    cells = [(T, N) for T in args.eval_lens for N in args.eval_pairs if 4 * N <= T]
    print()
    print("| T | N pairs | " + " | ".join(arms) + " |")
    print("|---|---|" + "---|" * len(arms))
    for T, N in cells:
        print(f"| {T} | {N} | " + " | ".join(f"{results['arms'][a]['eval'][f'{T}/{N}']:.3f}" for a in arms) + " |")
    print()
    print("| arm | pattern | params | steps | train tokens | train min | final train acc (ema) |")
    print("|---|---|---|---|---|---|---|")
    for a in arms:
        r = results["arms"][a]
        print(f"| {a} | `{r['pattern']}` | {r['params']:,} | {r['steps']} | {r['tokens']:,} | "
              f"{r['seconds'] / 60:.1f} | {r['final_acc_ema']:.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

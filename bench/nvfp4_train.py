"""NVFP4 (or bf16) vs fp32 pretraining: the same model, init and data, trained with `--precision fp32` and `nvfp4`.

    python bench/nvfp4_train.py [--recipe recipes/tiny-test.json] [--steps 200] [--hidden 128] [--seq 64]
                                [--batch 8] [--sources stdlib/email ...] [--precisions fp32 bf16]

Runs the real trainer (`nemotron3.train.pretrain.train`) twice into temporary directories with the same seed
(so the same initial weights and the same batches), one thread. Prints the final train LM loss (mean of the
last 10 steps), the final validation LM loss (as trained: nvfp4 evaluates with its NVFP4 forward) and that of
the saved fp32 checkpoint run as an ordinary model, the relative gaps nvfp4 vs fp32 and the tokens/s of each.
NVFP4 is emulated (fake quantization in fp32), so on a CPU it is *slower* than fp32; tokens/s here measures
the emulation's overhead, not what FP4 tensor cores give.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nemotron3  # noqa: E402
from nemotron3.train.data import prepare_data  # noqa: E402
from nemotron3.train.pretrain import train  # noqa: E402
from nemotron3.train.recipe import load_recipe  # noqa: E402


@torch.no_grad()
def plain_val_loss(ckpt: Path, val_ds, n: int, batch: int) -> float:
    """Validation LM loss of a saved checkpoint run as an ordinary fp32 model (no fake quantization)."""
    model = nemotron3.load(ckpt, dtype=torch.float32).eval()
    tot = cnt = 0.0
    for i in range(0, n, batch):
        x, y = val_ds.rows(np.arange(i, min(n, i + batch)))
        logits = model(x)
        tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                               reduction="sum").item()
        cnt += (y != -100).sum().item()
    return tot / cnt


def run(recipe: dict, precision: str, out: Path, val_ds) -> dict:
    r = json.loads(json.dumps(recipe))
    r["train"]["precision"], r["out_dir"] = precision, str(out)
    train(r, progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    tail = log[-10:]
    t = r["train"]
    n_val = min(len(val_ds), t["eval_batches"] * t["batch_size"])
    return {"train": sum(x["lm_loss"] for x in tail) / len(tail), "val": log[-1]["val_loss"],
            "val_plain": plain_val_loss(out / "checkpoint", val_ds, n_val, t["batch_size"]),
            "first": log[0]["lm_loss"], "tok_s": log[-1]["tokens"] / log[-1]["time"],
            "curve": [x["lm_loss"] for x in log]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-test.json"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=128, help="model hidden_size (the tiny recipe has 64)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sources", nargs="+", default=["stdlib/email", "stdlib/asyncio", "stdlib/logging", "stdlib/http",
                                                     "stdlib/multiprocessing", "stdlib/json"],
                    help="corpus sources (~1.6 MB of stdlib: the runs stay under one epoch, no memorisation)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "nvfp4"], choices=["fp32", "bf16", "nvfp4"],
                    help="compared with the first (bf16: autocast, as `train.precision: bf16`)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        over = {"data.corpus_dir": str(tmp / "corpus"), "data.tokenizer_dir": str(tmp / "tok"),
                "data.seq_len": a.seq, "data.sources": a.sources, "model.hidden_size": a.hidden,
                "train.total_steps": a.steps,
                "train.warmup_steps": max(1, a.steps // 20), "train.batch_size": a.batch,
                "train.eval_every": a.steps, "train.save_every": a.steps, "train.eval_batches": 8,
                "train.threads": 1}
        recipe = load_recipe(a.recipe, over)
        train_ds, val_ds = prepare_data(recipe, recipe["model"]["vocab_size"])
        res = {p: run(recipe, p, tmp / p, val_ds) for p in a.precisions}
    m = recipe["model"]
    print(f"config: pattern {m['pattern']} hidden {m['hidden_size']} vocab {m['vocab_size']} | {a.steps} steps x "
          f"{a.batch} x {a.seq} tokens ({len(train_ds)} train rows) | seed {recipe['train']['seed']} | 1 thread")
    for p, r in res.items():
        pts = [r["curve"][i] for i in (0, len(r["curve"]) // 4, len(r["curve"]) // 2, 3 * len(r["curve"]) // 4)]
        print(f"{p:6s} train LM loss (last 10) {r['train']:.4f} | val {r['val']:.4f} (checkpoint run in fp32: "
              f"{r['val_plain']:.4f}) | {r['tok_s']:,.0f} tok/s | "
              f"curve at 0/25/50/75%: {' '.join(f'{x:.3f}' for x in pts)}")
    base = a.precisions[0]
    f = res[base]
    for p in a.precisions[1:]:
        n = res[p]
        print(f"relative gap {p} vs {base}: train {(n['train'] - f['train']) / f['train']:+.2%} | "
              f"val {(n['val'] - f['val']) / f['val']:+.2%} | val of the checkpoint run in fp32 "
              f"{(n['val_plain'] - f['val_plain']) / f['val_plain']:+.2%} | "
              f"{p} speed {n['tok_s'] / f['tok_s']:.2f}x {base}" + (" (emulated)" if p == "nvfp4" else ""))


if __name__ == "__main__":
    main()

"""Loss against tokens seen, across consecutive training stages (the model card's base-model plot).

    python scripts/plot_tokens.py runs/pico/log.jsonl runs/pico-copy/log.jsonl runs/pico-copy-mix/log.jsonl \
        --out runs/eval/base-loss.png

Each stage's `log.jsonl` counts `tokens` from its own start; stages are laid end to end, so the x axis is the
model's total tokens. Plotted: the train LM loss (`train.pretrain.debiased_ema`, as `train.pretrain.plot`) and
the validation loss of every stage, with a line where each stage begins. Prints the total tokens.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nemotron3.train.pretrain import debiased_ema  # noqa: E402


def stage_records(path: Path) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not recs or not all("tokens" in r for r in recs):
        raise SystemExit(f"error: {path} holds no training records with a 'tokens' count")
    return recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=Path, help="log.jsonl of each stage, in training order")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5))
    offset = 0
    for i, path in enumerate(a.logs):
        recs = stage_records(path)
        name = path.parent.name
        train = [r for r in recs if "lm_loss" in r]
        x = [(offset + r["tokens"]) / 1e6 for r in train]
        ax.plot(x, debiased_ema([r["lm_loss"] for r in train]), color=f"C{i}", alpha=0.6,
                label=f"{name}: train LM loss (EMA)")
        val = [((offset + r["tokens"]) / 1e6, r["val_loss"]) for r in recs if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", color=f"C{i}", markersize=3, label=f"{name}: val loss")
        if i:
            ax.axvline(offset / 1e6, color="gray", lw=0.8, ls="--")
        offset += recs[-1]["tokens"]
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{offset / 1e6:.1f}M tokens over {len(a.logs)} stage(s)")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, a.out)
    print(f"{offset:,} tokens -> {a.out}")


if __name__ == "__main__":
    main()

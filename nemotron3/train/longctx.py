"""Long-context extension stage: `python -m nemotron3.train.longctx RECIPE.json [--resume] [--set k=v]`.

Continued pretraining of a base model (`init`) at a constant low learning rate on a mixture of long and short
sequences, as Nemotron 3's long-context phase mixes 1M- and 4K-token sequences and adds synthetic long-range
retrieval data (recipes.md §3). At our scale "long" is 8K tokens (what one CPU thread trains at ~250 tokens/s)
and "short" is the pretraining length. Mixture components are the trainer's (`data.mix`, see data.Mixture);
a component with `"source": "retrieval"` is generated here first: `docs` synthetic documents of `seq_len`
tokens from the corpus's train split (eval/ruler.retrieval_training_docs: needles and recall lines worded
differently from the RULER evaluation prompts, whose haystack comes from the val split). The short-context
validation loss (corpus val split at data.seq_len) is logged so a regression is visible; the same recipe
trains the ablations (train/surgery.py) for `nemotron3 eval ruler`. The recipe is pretraining's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..tokenizer import load_tokenizer
from .corpus import iter_documents
from .recipe import PRETRAIN, stage_parser, train_stage


def resolve_retrieval(recipe: dict) -> dict:
    """Replace each `"source": "retrieval"` component (`rows` rows of its seq_len, optional `seed`) by the
    token and answer-mask `.npy` streams of `train/retrieval.py` (built once under OUT_DIR/data, then reused)."""
    d = recipe["data"]
    data_dir = Path(recipe["out_dir"]) / "data"
    hay = tok = None
    for i, c in enumerate(d.get("mix") or []):
        if c.get("source") != "retrieval":
            continue
        if not isinstance(c.get("rows"), int) or isinstance(c["rows"], bool) or c["rows"] < 1:
            raise ValueError(f"data.mix[{i}]: a 'retrieval' component needs \"rows\": a positive integer, "
                             f"got {c.get('rows')!r}")
        seed = c.get("seed", recipe["train"]["seed"] + i)
        stem = data_dir / f"retrieval-{c['seq_len']}x{c['rows']}-seed{seed}"
        paths = stem.with_suffix(".tokens.npy"), stem.with_suffix(".mask.npy")
        if not all(p.exists() for p in paths):
            from ..eval.ruler import Haystack
            from .retrieval import retrieval_rows
            if hay is None:          # the corpus's train split, tokenized once for every component
                tok = load_tokenizer(d["tokenizer_dir"])
                hay = Haystack([doc["text"] for doc in iter_documents(d["corpus_dir"], "train")], tok)
            arrays = retrieval_rows(c["rows"], c["seq_len"], tok, hay, seed=seed)
            data_dir.mkdir(parents=True, exist_ok=True)
            for p, arr in zip(paths, arrays):
                tmp = p.with_name(p.name + ".tmp.npy")
                np.save(tmp, arr)
                tmp.replace(p)
            print(f"built {paths[0]} ({c['rows']} rows, {int(arrays[1].sum())} answer tokens)", file=sys.stderr)
        keep = {k: v for k, v in c.items() if k not in ("rows", "seed", "source")}
        d["mix"][i] = {**keep, "source": str(paths[0]), "mask": str(paths[1])}
    return recipe


def main(argv=None):
    from .pretrain import train
    ap = stage_parser("python -m nemotron3.train.longctx", __doc__)
    ap.add_argument("--init", help="model dir to extend (overrides the recipe's init)")
    a = ap.parse_args(argv)
    train_stage(ap, a, PRETRAIN, train, prepare=resolve_retrieval, overrides={"init": a.init} if a.init else None)


if __name__ == "__main__":
    main()

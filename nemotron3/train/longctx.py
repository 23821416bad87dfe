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

import json
import sys
from pathlib import Path

from ..tokenizer import load_tokenizer
from .corpus import iter_documents
from .recipe import PRETRAIN, stage_parser, train_stage


def resolve_retrieval(recipe: dict) -> dict:
    """Replace each `"source": "retrieval"` component by a generated .jsonl (built once, then reused)."""
    d = recipe["data"]
    data_dir = Path(recipe["out_dir"]) / "data"
    hay = None
    for i, c in enumerate(d.get("mix") or []):
        if c.get("source") != "retrieval":
            continue
        path = data_dir / f"retrieval-{i}-{c['seq_len']}x{c['docs']}.jsonl"
        if not path.exists():
            from ..eval.ruler import Haystack, retrieval_training_docs
            if hay is None:          # the corpus's train split, tokenized once for every component
                tok = load_tokenizer(d["tokenizer_dir"])
                hay = Haystack([doc["text"] for doc in iter_documents(d["corpus_dir"], "train")], tok)
            docs = retrieval_training_docs(c["docs"], c["seq_len"], tok, hay,
                                           seed=c.get("seed", recipe["train"]["seed"]) + i)
            data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
            tmp.replace(path)
            print(f"built {path} ({len(docs)} documents)", file=sys.stderr)
        d["mix"][i] = {**{k: v for k, v in c.items() if k not in ("docs", "seed")}, "source": str(path)}
    return recipe


def main(argv=None):
    from .pretrain import train
    ap = stage_parser("python -m nemotron3.train.longctx", __doc__)
    ap.add_argument("--init", help="model dir to extend (overrides the recipe's init)")
    a = ap.parse_args(argv)
    train_stage(ap, a, PRETRAIN, train, prepare=resolve_retrieval, overrides={"init": a.init} if a.init else None)


if __name__ == "__main__":
    main()

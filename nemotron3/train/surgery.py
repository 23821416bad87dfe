"""Model surgery for controlled ablations: `python -m nemotron3.train.surgery SRC DST --pattern P [--fresh 3,8]`.

Builds a model with SRC's config changed as asked (a new `hybrid_override_pattern` of the same length, no MTP
block, ...), copies every SRC tensor whose name and shape exist in the new model, and leaves the rest at the
model's own initialisation (model.init_weights). Layers whose kind changed (e.g. `*` -> `M`) are therefore fresh,
and `--fresh` re-initialises chosen layers of unchanged kind, so "replace attention by Mamba" and "re-initialise
attention" are the two arms of one ablation that differ only in the layer type. Tokenizer files are copied.
"""
from __future__ import annotations

import argparse

import torch

from .. import checkpoint
from ..config import NemotronConfig
from ..model import NemotronHForCausalLM
from .state import copy_tokenizer


def transplant(src: NemotronHForCausalLM, config: NemotronConfig, fresh_layers=(), seed: int = 0):
    """New model for `config` holding `src`'s tensors wherever name and shape agree (except `fresh_layers`).
    Returns (model, names of tensors left freshly initialised)."""
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(config)
    old = src.state_dict()
    prefixes = tuple(f"backbone.layers.{i}." for i in fresh_layers)
    kept, new = {}, []
    for name, t in model.state_dict().items():
        if name in old and old[name].shape == t.shape and not name.startswith(prefixes):
            kept[name] = old[name].to(t.dtype)
        else:
            new.append(name)
    model.load_state_dict(kept, strict=False)
    return model, new


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nemotron3.train.surgery", description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--pattern", help="new hybrid_override_pattern (same length as SRC's)")
    ap.add_argument("--mtp-layers", type=int, help="num_nextn_predict_layers (0 drops the MTP block)")
    ap.add_argument("--fresh", default="", help="comma-separated backbone layer indices to re-initialise")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    src = checkpoint.load(a.src, dtype=torch.float32)
    changes = {}
    if a.pattern:
        if len(a.pattern) != len(src.config.pattern):
            ap.error(f"--pattern has {len(a.pattern)} layers, SRC has {len(src.config.pattern)}")
        changes["pattern"] = a.pattern
    if a.mtp_layers is not None:
        changes["num_nextn_predict_layers"] = a.mtp_layers
    fresh = [int(i) for i in a.fresh.split(",") if i.strip()]
    model, new = transplant(src, src.config.replace(**changes), fresh, a.seed)
    checkpoint.save(model, a.dst, dtype=torch.float32)
    copy_tokenizer(a.src, a.dst)
    n_new = sum(model.state_dict()[k].numel() for k in new)
    print(f"{a.dst}: pattern {model.config.pattern}, {model.num_parameters():,} params, "
          f"{n_new:,} freshly initialised in {len(new)} tensors")


if __name__ == "__main__":
    main()

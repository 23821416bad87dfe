"""A torchrun worker for tests/test_train_parallel.py: `python -m nemotron3.train`'s CLI, and afterwards each
rank's router biases written to OUT_DIR/bias_rank{R}.safetensors (to check that every rank keeps identical
routers)."""
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from nemotron3.train import pretrain

runs = []
init = pretrain.Pretrainer.__init__


def capture(self, *a, **kw):
    init(self, *a, **kw)
    runs.append(self)


pretrain.Pretrainer.__init__ = capture
try:
    pretrain.main(sys.argv[1:])
finally:
    if runs:
        out = Path(sys.argv[sys.argv.index("--out-dir") + 1])
        save_file({n: b.clone() for n, b in runs[0].model.named_buffers() if n.endswith("e_score_correction_bias")},
                  str(out / f"bias_rank{os.environ['RANK']}.safetensors"))

"""bench/recall_ablation.py: MQAR generator invariants and a few training steps for both arms."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "bench" / "recall_ablation.py"
_spec = importlib.util.spec_from_file_location("recall_ablation", _PATH)
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)


@pytest.mark.parametrize("T,N", [(64, 8), (256, 32), (256, 64), (1024, 16)])
def test_mqar_sequence(T, N):
    ids, labels = R.make_sequence(T, N, torch.Generator().manual_seed(T + N))
    assert ids.shape == labels.shape == (T,)
    assert int(ids.min()) >= R.NOISE[0] and int(ids.max()) < R.VOCAB
    is_key = (ids >= R.KEYS[0]) & (ids < R.KEYS[1])
    C = T - 2 * N
    pos = (labels != R.IGNORE).nonzero().flatten()
    assert pos.tolist() == list(range(C, T, 2))               # labels only at the N query keys
    # context: N distinct keys, each immediately followed by a value; everything else is noise
    ctx_keys = is_key[:C].nonzero().flatten()
    assert len(ctx_keys) == N and len(set(ids[ctx_keys].tolist())) == N
    vals = ids[ctx_keys + 1]
    assert bool(((vals >= R.VALUES[0]) & (vals < R.VALUES[1])).all())
    paired = dict(zip(ids[ctx_keys].tolist(), vals.tolist()))
    assert int(((ids[:C] >= R.VALUES[0])).sum()) == N
    # queries: every key once; the label (and the next input token) is the value paired earlier
    assert sorted(ids[pos].tolist()) == sorted(paired)
    for p in pos.tolist():
        assert labels[p].item() == paired[ids[p].item()] == ids[p + 1].item()


def test_batch_shapes_and_determinism():
    a = R.make_batch(4, 256, (16, 32), R.batch_gen(0, 5))
    b = R.make_batch(4, 256, (16, 32), R.batch_gen(0, 5))
    assert a[0].shape == a[1].shape == (4, 256)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    n = (a[1] != R.IGNORE).sum(1)
    assert bool(((n >= 16) & (n <= 32)).all())
    with pytest.raises(ValueError):
        R.make_sequence(256, 65, torch.Generator())


def test_arms_train_a_few_steps():
    torch.set_num_threads(1)
    cfgs = R.arm_configs("M-*-M-")
    assert cfgs["hybrid"].pattern.count("*") == 1 and "*" not in cfgs["pure-ssm"].pattern
    for name, cfg in cfgs.items():
        model = R.build_model(cfg, 0)
        stats = R.train_arm(model, 3, seed=0, batch=2, T=64, pairs=(4, 8), lr=1e-3, warmup=1, min_lr=1e-4,
                            name=name)
        assert math.isfinite(stats["final_loss_ema"])
        acc = R.evaluate(model, 128, 8, 2, seed=0)
        assert 0.0 <= acc <= 1.0

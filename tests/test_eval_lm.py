"""Held-out LM evaluation against a direct computation."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from helpers import randomize, small_config
from nemotron3 import NemotronHForCausalLM
from nemotron3.eval.lm import evaluate_lm
from nemotron3.train.data import PackedDataset


def test_evaluate_lm_matches_direct_computation():
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(small_config("M*E", num_nextn_predict_layers=1)).eval())
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, model.config.vocab_size, 200).astype(np.uint16)
    tokens[[40, 90, 150]] = 2                                   # document ends (eos id 2)
    ds = PackedDataset(tokens, seq_len=24, eos_id=2, shuffle=False)
    out = evaluate_lm(model, ds, batch_size=3, mtp_depths=2)
    nll, n, hits, cnt = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in ds.eval_batches(3):
            logits = model(x)
            m = y != -100
            nll += F.cross_entropy(logits[m], y[m], reduction="sum").item()
            n += m.sum().item()
            h = model.hidden_states(x)
            d1, _ = model.mtp_step(h[:, :-1], x[:, 1:])             # depth 1: predicts token t+2 = labels[t+1]
            t1 = y[:, 1:].clone()
            t1[y[:, :-1] == -100] = -100                            # chain crosses a document end
            m1 = t1 != -100
            hits += (d1.argmax(-1)[m1] == t1[m1]).sum().item()
            cnt += m1.sum().item()
    assert out["tokens"] == n
    assert math.isclose(out["loss"], nll / n, rel_tol=1e-6)
    assert math.isclose(out["perplexity"], math.exp(nll / n), rel_tol=1e-6)
    assert math.isclose(out["mtp_accuracy"][0], hits / cnt, rel_tol=1e-9)
    assert len(out["mtp_accuracy"]) == 2

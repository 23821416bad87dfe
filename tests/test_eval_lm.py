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


class _Copier(torch.nn.Module):
    """Predicts token t+1 as the token that followed the previous occurrence of token t (an ideal induction
    head), uniform when token t has not occurred before: the reference the probe's bookkeeping is checked on."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        out = torch.zeros(*x.shape, self.vocab)
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                prev = [j for j in range(t) if x[b, j] == x[b, t]]
                if prev and prev[-1] + 1 < x.shape[1]:
                    out[b, t, x[b, prev[-1] + 1]] = 50.0
        return out


def test_induction_score_separates_a_copier_from_a_random_model():
    from nemotron3.eval.lm import induction_score
    vocab = 5000                                   # large: repeats inside one random copy are rare
    copier = induction_score(_Copier(vocab), vocab, length=12, n=5, batch_size=2)
    assert copier["second_copy_accuracy"] > 0.95 and copier["second_copy_loss"] < 0.5
    assert math.isclose(copier["first_copy_loss"], math.log(vocab), rel_tol=0.02)   # uniform: no earlier copy
    assert copier["first_copy_accuracy"] < 0.05
    assert math.isclose(copier["copy_gain"], copier["first_copy_loss"] - copier["second_copy_loss"])
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(small_config("M*E", vocab_size=300)).eval())
    rnd = induction_score(model, 300, length=16, n=6)
    assert abs(rnd["copy_gain"]) < 0.3 * rnd["first_copy_loss"]
    try:
        induction_score(model, 300, length=1)
    except ValueError as e:
        assert "length >= 2" in str(e)
    else:
        raise AssertionError("length=1 accepted")


def test_eval_lm_cli_reports_loss_and_copying(tmp_path, capsys):
    """`nemotron3 eval lm DIR`: held-out loss plus the copying probe, on a model directory written to disk."""
    import json

    from nemotron3.checkpoint import save
    from nemotron3.cli import main
    from nemotron3.tokenizer import train_tokenizer
    text = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "val"):
        (corpus / f"{split}.jsonl").write_text(json.dumps({"path": "a.py", "text": text}) + "\n")
    train_tokenizer([text], 300, tmp_path / "model")
    torch.manual_seed(0)
    save(randomize(NemotronHForCausalLM(small_config("M*E", vocab_size=300, num_nextn_predict_layers=1)).eval()),
         tmp_path / "model")
    main(["eval", "lm", str(tmp_path / "model"), "--corpus", str(corpus), "--seq-len", "32", "--mtp-depths", "1",
          "--json", str(tmp_path / "out" / "lm.json")])
    out = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "out" / "lm.json").read_text()) == out
    assert out["tokens"] > 0 and len(out["mtp_accuracy"]) == 1
    ind = out["induction"]
    assert ind["rows"] == 32 and ind["length"] == 64
    assert math.isclose(ind["copy_gain"], ind["first_copy_loss"] - ind["second_copy_loss"])

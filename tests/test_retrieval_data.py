"""Synthetic retrieval rows of the long-context stage (train/retrieval.py): lengths, answer-only masks that
point at the right needle, determinism, and the longctx recipe's "retrieval" source end to end."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from nemotron3.eval.ruler import Haystack
from nemotron3.tokenizer import load_tokenizer
from nemotron3.train.data import IGNORE, build_component
from nemotron3.train.longctx import resolve_retrieval
from nemotron3.train.retrieval import retrieval_rows

PICO = Path(__file__).resolve().parent.parent / "models" / "pico"
TEXT = ("The quick brown fox jumps over the lazy dog near the river bank.\n"
        "    def handler(request, response):\n        return response.status == 200\n"
        "Configuration options are read from the environment at startup time.\n")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(PICO)


def _spans(mask):
    """[start, end) runs of ones."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


@pytest.mark.parametrize("length", [512, 2048])
def test_rows_are_exact_and_masks_are_the_answers(tok, length):
    hay = Haystack([TEXT * 20 + f"Document {i}.\n" for i in range(4)], tok)
    tokens, mask = retrieval_rows(6, length, tok, hay, seed=3)
    assert tokens.shape == mask.shape == (6 * length + 1,) and tokens.dtype == np.int32
    for i in range(6):
        row, m = tokens[i * length:(i + 1) * length], mask[i * length:(i + 1) * length]
        assert row[-1] == tok.eos_id and tok.pad_id not in row.tolist()
        text = tok.decode(row[:-1].tolist())
        spans = _spans(m)
        assert 1 <= len(spans) <= 3
        for a, b in spans:
            answer = tok.decode(row[a:b].tolist())
            value = re.fullmatch(r" (\d{5,7})\.", answer)
            assert value, answer
            # the text before the answer names a key whose needle (earlier) carries exactly this value
            before = tok.decode(row[:a].tolist())
            key = re.findall(r"([a-z]+-[a-z]+)", before.rsplit("\n", 1)[-1])[-1]
            needle_lines = [ln for ln in text.split("\n") if key in ln and value.group(1) in ln]
            assert len(needle_lines) >= 2, (key, value.group(1))       # the needle and the question line
    again = retrieval_rows(6, length, tok, [TEXT * 20 + f"Document {i}.\n" for i in range(4)], seed=3)
    assert np.array_equal(tokens, again[0]) and np.array_equal(mask, again[1])
    assert not np.array_equal(tokens, retrieval_rows(6, length, tok, hay, seed=4)[0])


def test_too_short_rows_are_an_error(tok):
    with pytest.raises(ValueError, match="need more than"):
        retrieval_rows(1, 40, tok, [TEXT * 5], seed=0)


def test_longctx_retrieval_source_trains_only_on_answers(tok, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text("".join(json.dumps({"text": TEXT * 20 + f"Doc {i}.\n"}) + "\n"
                                                for i in range(4)))
    recipe = {"out_dir": str(tmp_path / "out"), "train": {"seed": 7},
              "data": {"corpus_dir": str(corpus), "tokenizer_dir": str(PICO),
                       "mix": [{"source": "retrieval", "seq_len": 512, "batch_size": 2, "weight": 1, "rows": 4}]}}
    r = resolve_retrieval(json.loads(json.dumps(recipe)))
    comp = r["data"]["mix"][0]
    assert comp["source"].endswith(".tokens.npy") and comp["mask"].endswith(".mask.npy") and "rows" not in comp
    mtime = Path(comp["source"]).stat().st_mtime_ns
    assert resolve_retrieval(json.loads(json.dumps(recipe)))["data"]["mix"][0] == comp      # built once, reused
    assert Path(comp["source"]).stat().st_mtime_ns == mtime
    ds = build_component(comp, corpus, tok, seed=0, shuffle=False)
    x, y = ds.rows([0, 1, 2, 3])
    learned = y != IGNORE
    assert 0 < int(learned.sum()) < 4 * 40                  # a few answer tokens per row, nothing else
    for row in range(4):
        ans = tok.decode(y[row][learned[row]].tolist())
        assert re.fullmatch(r"( \d{5,7}\.)+", ans), ans
    bad = json.loads(json.dumps(recipe))
    bad["data"]["mix"][0]["rows"] = 0
    with pytest.raises(ValueError, match="rows"):
        resolve_retrieval(bad)

"""RULER-style retrieval: sample construction, grading, determinism and the CLI; the long-context stage's
synthetic retrieval rows (train/retrieval.py: lengths, answer-only masks pointing at the right needle, the
longctx recipe's "retrieval" source end to end)."""
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_utils import one_thread  # noqa: F401  (autouse fixture)
from nemotron3.eval import ruler
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


@pytest.fixture(scope="module")
def docs():
    return [(TEXT * 6) + f"Document {i} ends here.\n" for i in range(5)]


def _find(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("length", [512, 1024])
def test_sample_length_needles_answers(tok, docs, task, length):
    s = ruler.build_sample(task, length, tok, docs, random.Random(7))
    assert abs(len(s.prompt_ids) - length) <= 0.02 * length
    text = tok.decode(s.prompt_ids)
    for needle, pos in zip(s.needles, s.needle_positions):
        ids = tok.encode(needle + "\n", parse_special=False)
        assert _find(s.prompt_ids, ids) == [pos]                      # present exactly once, where reported
    for a in s.answers:
        assert a.isdigit() and 5 <= len(a) <= 7
        assert a in ruler.found_values(text)
    tail = text[text.rindex("\n") + 1:]
    if task == "variable_tracking":
        var = tail.split("VAR ")[1].split("?")[0]
        # follow the chain backwards through the needles to the value
        assign = dict(n[len("VAR "):-1].split(" = ") for n in s.needles)
        while not assign[var].isdigit():
            var = assign[var]
        assert [assign[var]] == s.answers
    else:
        key = tail.split(" for ")[1].split("?")[0]
        values = [n.split(" is ")[1][:-1] for n in s.needles if f" for {key} is " in n]
        assert sorted(values) == sorted(s.answers)
        assert text.count(f"for {key} is ") == len(s.answers)          # the needles only (prefix ends "is"/"are")


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_single_needle_depth(tok, docs, depth):
    s = ruler.build_sample("niah_single", 1024, tok, docs, random.Random(1), depth=depth)
    head = len(tok.encode(ruler._NIAH_INSTR["niah_single"] + "\n\n", parse_special=False))
    text = tok.decode(s.prompt_ids)
    tail = len(tok.encode(text[text.rindex("\n"):], parse_special=False))
    hay = len(s.prompt_ids) - head - len(tok.encode(s.needles[0] + "\n", parse_special=False)) - tail
    got = (s.needle_positions[0] - head) / hay
    assert abs(got - depth) < 0.08                                    # within a haystack line of the target


def test_make_sample_deterministic(tok, docs):
    a = ruler.make_sample("niah_multikey", 600, tok, docs, random.Random(3))
    b = ruler.make_sample("niah_multikey", 600, tok, docs, random.Random(3))
    c = ruler.make_sample("niah_multikey", 600, tok, docs, random.Random(4))
    assert a == b and a != c
    assert ruler.sample_rng(0, "niah_single", 512, 1).random() == ruler.sample_rng(0, "niah_single", 512, 1).random()


def test_grading():
    assert ruler.score(" 482133.", ["482133"]) == 1.0
    assert ruler.score(" the number is 482133 and", ["482133"]) == 1.0
    assert ruler.score(" 4821330.", ["482133"]) == 0.0                 # a longer number does not count
    assert ruler.score(" 1482133", ["482133"]) == 0.0
    assert ruler.score(" nothing here", ["482133"]) == 0.0
    assert ruler.score(" 11111, 22222 and 44444", ["11111", "22222", "33333", "44444"]) == 0.75


def test_evaluate_with_tiny_model(tok, docs):
    from engine_utils import tiny_model
    from nemotron3.engine import LLM
    model = tiny_model(seed=0, mtp=False, vocab_size=tok.vocab_size, max_position_embeddings=2048)
    llm = LLM(model, tok, max_num_seqs=2, enable_prefix_caching=False)
    rep = ruler.evaluate_ruler(llm, docs, ["niah_single", "niah_multivalue"], [300], samples=2, batch=2)
    assert set(rep["accuracy"]) == {"niah_single", "niah_multivalue"}
    for task in rep["accuracy"]:
        row = rep["results"][task]["300"]
        assert len(row["samples"]) == 2 and all(s["prompt_tokens"] == 300 for s in row["samples"])
        assert row["accuracy"] == sum(s["score"] for s in row["samples"]) / 2
    assert "niah_single" in ruler.format_table(rep)


def test_cli_json(tmp_path, capsys, docs):
    from nemotron3.cli import main
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "val.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"path": f"v{i}", "text": d}) + "\n")
    out = tmp_path / "r.json"
    torch.manual_seed(0)
    main(["eval", "ruler", str(PICO), "--corpus", str(corpus), "--lengths", "256,512", "--tasks",
          "niah_single,variable_tracking", "--samples", "1", "--json", str(out), "--threads", "1"])
    table = capsys.readouterr().out
    assert "niah_single" in table and "variable_tracking" in table and "512" in table
    rep = json.loads(out.read_text())
    assert rep["lengths"] == [256, 512] and rep["tasks"] == ["niah_single", "variable_tracking"]
    assert set(rep["accuracy"]["niah_single"]) == {"256", "512"}
    for task in rep["tasks"]:
        for n in ("256", "512"):
            assert 0.0 <= rep["accuracy"][task][n] <= 1.0
            s = rep["results"][task][n]["samples"][0]
            assert s["prompt_tokens"] == int(n) and s["score"] == ruler.score(s["generated"], s["answers"])
    with pytest.raises(SystemExit):
        main(["eval", "ruler", str(PICO), "--corpus", str(corpus), "--tasks", "nope", "--lengths", "256"])
    with pytest.raises(SystemExit, match="--depth"):
        main(["eval", "ruler", str(PICO), "--corpus", str(corpus), "--lengths", "256", "--depth", "1.5"])
    main(["eval", "ruler", str(PICO), "--corpus", str(corpus), "--lengths", "256", "--tasks", "niah_single",
          "--samples", "2", "--depth", "0", "--json", str(out), "--threads", "1"])
    rep = json.loads(out.read_text())                 # --depth 0: the needle opens the document
    assert rep["depth"] == 0.0 and [s["depths"][0] for s in rep["results"]["niah_single"]["256"]["samples"]] == [0, 0]
    bare = tmp_path / "checkpoint"                        # a training checkpoint: weights and config, no tokenizer
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).symlink_to(PICO / f)
    with pytest.raises(SystemExit, match="no tokenizer.json"):
        main(["eval", "ruler", str(bare), "--corpus", str(corpus), "--tasks", "niah_single", "--lengths", "256"])


# ---------------------------------------------------------------------------------------------- training rows
def _spans(mask):
    """[start, end) runs of ones."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


@pytest.mark.parametrize("length", [512, 2048])
def test_rows_are_exact_and_masks_are_the_answers(tok, length):
    hay = ruler.Haystack([TEXT * 20 + f"Document {i}.\n" for i in range(4)], tok)
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

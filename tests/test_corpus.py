"""Offline stdlib corpus: determinism, dedup, filtering, disjoint splits."""

import json
import sysconfig
from pathlib import Path

import pytest

from nemotron3.train.corpus import _collect, _split_value, build_corpus, iter_documents

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = [STDLIB / p for p in ("json", "textwrap.py", "colorsys.py", "keyword.py", "string.py", "bisect.py")]


def test_build_is_deterministic(tmp_path):
    m1 = build_corpus(tmp_path / "a", sources=SMALL)
    m2 = build_corpus(tmp_path / "b", sources=SMALL)
    assert m1 == m2
    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "PSF" in m1["licence"]
    assert m1["documents"]["val"] >= 1 and m1["documents"]["train"] >= 5


def test_splits_disjoint_sorted_and_complete(tmp_path):
    m = build_corpus(tmp_path, sources=SMALL, val_fraction=0.3)
    train = [d["path"] for d in iter_documents(tmp_path, "train")]
    val = [d["path"] for d in iter_documents(tmp_path / "val.jsonl")]
    assert not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    assert len(train) == m["documents"]["train"] and len(val) == m["documents"]["val"]
    assert all(p.startswith("stdlib/") for p in train + val)
    assert "stdlib/json/decoder.py" in train + val
    # the split depends only on each document's own path (stable when the corpus grows)
    assert all(_split_value(p) < 0.3 for p in val) and all(_split_value(p) >= 0.3 for p in train)
    doc = next(d for d in iter_documents(tmp_path, "train") if d["path"] == "stdlib/textwrap.py") \
        if "stdlib/textwrap.py" in train else next(d for d in iter_documents(tmp_path, "val")
                                                   if d["path"] == "stdlib/textwrap.py")
    assert doc["text"] == (STDLIB / "textwrap.py").read_text(encoding="utf-8")


def test_dedup_and_filters(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_bytes(b"x = 1\n")
    (src / "b.py").write_bytes(b"x = 1\r\n\n")  # same text after newline normalisation/strip
    (src / "c.py").write_text("print('h\u00e9llo \u4e16\u754c')\n", encoding="utf-8")
    (src / "d.py").write_text("y = 2\n")
    (src / "empty.py").write_text("  \n")
    (src / "latin1.py").write_bytes(b"s = '\xe9'\n")
    (src / "big.txt").write_text("z" * ((1 << 20) + 1))
    (src / "data.bin").write_bytes(b"ignored: not .py/.txt")
    (src / "tests").mkdir()
    (src / "tests" / "t.py").write_text("excluded = True\n")
    m = build_corpus(tmp_path / "out", sources=[src], val_fraction=0.0)
    docs = list(iter_documents(tmp_path / "out"))
    assert [Path(d["path"]).name for d in docs] == ["a.py", "c.py", "d.py"]
    assert docs[1]["text"] == "print('h\u00e9llo \u4e16\u754c')\n"
    assert m["skipped"] == {"duplicate": 1, "empty": 1, "unreadable_or_large": 2}
    assert m["documents"] == {"train": 3, "val": 0}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m


def test_stdlib_source_excludes_tests_and_site_packages():
    labelled, kinds = _collect(["stdlib"])
    paths = [label for label, _ in labelled]
    assert kinds == ["stdlib"] and len(paths) > 300
    assert "stdlib/json/decoder.py" in paths
    bad = ("/test/", "/tests/", "/idle_test/", "site-packages", "/test_")
    assert not [p for p in paths if any(b in "/" + p for b in bad) or not p.endswith(".py")]


@pytest.mark.parametrize("fraction", [0.01, 0.5])
def test_val_fraction_roughly_respected(fraction):
    labels = [f"stdlib/m{i}.py" for i in range(4000)]
    share = sum(_split_value(p) < fraction for p in labels) / len(labels)
    assert abs(share - fraction) < 0.25 * fraction + 0.005

"""Packed batches: cross-document masking, token cache, exact resume, rank sharding."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from nemotron3.train.corpus import build_corpus, iter_documents
from nemotron3.eval.lm import IGNORE
from nemotron3.train.data import PackedDataset, load_tokens
from nemotron3.tokenizer import load_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = [STDLIB / p for p in ("json", "colorsys.py", "keyword.py", "bisect.py")]
EOS = 2


def _stream(n_docs=50, seed=0):
    """Synthetic token stream: documents of ids >= 12 separated by EOS."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(12, 300, size=rng.integers(1, 20)) for _ in range(n_docs)]
    return np.concatenate([np.append(d, EOS) for d in docs]).astype(np.uint16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    build_corpus(root / "corpus", sources=SMALL)
    train_tokenizer((d["text"] for d in iter_documents(root / "corpus")), 350, root / "tok")
    return root / "corpus", load_tokenizer(root / "tok")


def test_labels_are_next_tokens_with_cross_document_targets_masked():
    tokens = _stream()
    ds = PackedDataset(tokens, seq_len=16, eos_id=EOS, shuffle=False)
    assert ds.num_rows == (len(tokens) - 1) // 16
    x, y = ds.rows(np.arange(ds.num_rows))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (ds.num_rows, 16)
    flat_x, flat_y = x.flatten().numpy(), y.flatten().numpy()
    n = len(flat_x)
    assert np.array_equal(flat_x, tokens[:n])  # stride seq_len: inputs tile the stream
    target, after_eos = tokens[1:n + 1].astype(np.int64), flat_x == EOS
    assert after_eos.any() and (flat_y[after_eos] == IGNORE).all()
    assert np.array_equal(flat_y[~after_eos], target[~after_eos])
    # tiny hand-checked example
    ds = PackedDataset(np.array([5, 6, EOS, 7, 8, 9, EOS, 10, 11]), seq_len=4, eos_id=EOS, shuffle=False)
    x, y = ds.rows([0, 1])
    assert x.tolist() == [[5, 6, EOS, 7], [8, 9, EOS, 10]]
    assert y.tolist() == [[6, EOS, -100, 8], [9, EOS, -100, 11]]


def test_resume_reproduces_uninterrupted_run():
    ds = PackedDataset(_stream(200), seq_len=8, eos_id=EOS, seed=3)
    spe = ds.steps_per_epoch(4)
    run = list(ds.batches(4, num_steps=3 * spe + 2))  # crosses two epoch boundaries
    for k in (0, 1, spe - 1, spe, 2 * spe + 1, 3 * spe + 1):
        x, y = next(PackedDataset(_stream(200), seq_len=8, eos_id=EOS, seed=3).batches(4, start_step=k))
        assert torch.equal(x, run[k][0]) and torch.equal(y, run[k][1])
    # epochs are reshuffled, seeds matter, shuffle=False is sequential
    assert not np.array_equal(ds.batch_rows(0, 4), ds.batch_rows(spe, 4))
    assert not np.array_equal(ds.batch_rows(0, 4), PackedDataset(_stream(200), 8, EOS, seed=4).batch_rows(0, 4))
    assert PackedDataset(_stream(200), 8, EOS, shuffle=False).batch_rows(1, 4).tolist() == [4, 5, 6, 7]


def test_ranks_get_disjoint_rows():
    ds = PackedDataset(_stream(300), seq_len=8, eos_id=EOS, seed=1)
    world, bs = 3, 4
    spe = ds.steps_per_epoch(bs, world)
    seen = []
    for step in range(spe):
        per_rank = [ds.batch_rows(step, bs, rank=r, world_size=world) for r in range(world)]
        assert all(len(r) == bs for r in per_rank)
        seen += [int(i) for r in per_rank for i in r]
        x0, _ = ds.batch(step, bs, rank=0, world_size=world)
        assert torch.equal(x0, ds.rows(per_rank[0])[0])
    assert len(seen) == len(set(seen)) == spe * bs * world  # no row twice in an epoch, across ranks
    with pytest.raises(ValueError):
        ds.batch_rows(0, bs, rank=3, world_size=3)
    evals = [ds.eval_batches(5, rank=r, world_size=2) for r in range(2)]
    rows = sorted(tuple(row.tolist()) for it in evals for x, _ in it for row in x)
    assert rows == sorted(tuple(row.tolist()) for row in ds.rows(np.arange(ds.num_rows))[0])


def test_load_tokens_caches_and_preserves_documents(corpus):
    corpus_dir, tok = corpus
    tokens = load_tokens(corpus_dir, tok)
    caches = list(corpus_dir.glob("train.tokens-*.npy"))
    assert len(caches) == 1 and tokens.dtype == np.uint16
    assert np.array_equal(np.load(caches[0], allow_pickle=False), tokens)
    mtime = caches[0].stat().st_mtime_ns
    assert np.array_equal(load_tokens(corpus_dir, tok), tokens) and caches[0].stat().st_mtime_ns == mtime
    # one EOS per document, and each segment decodes back to the document text
    docs = [d["text"] for d in iter_documents(corpus_dir)]
    cuts = np.flatnonzero(tokens == tok.eos_id)
    assert len(cuts) == len(docs) and cuts[-1] == len(tokens) - 1
    for text, seg in zip(docs, np.split(tokens, cuts + 1)[:-1]):
        assert tok.decode(seg[:-1].tolist()) == text
    val = load_tokens(corpus_dir / "val.jsonl", tok, cache=False)
    assert (val == tok.eos_id).sum() == sum(1 for _ in iter_documents(corpus_dir, "val"))
    ds = PackedDataset.from_corpus(corpus_dir, tok, seq_len=32, seed=0)
    x, y = next(ds.batches(2))
    assert x.shape == (2, 32) and ((y == -100) == (x == tok.eos_id)).all()


def test_loss_mask_hides_targets_whose_mask_is_zero():
    tokens = _stream()
    mask = (np.arange(len(tokens)) % 3 != 0).astype(np.uint8)
    ds = PackedDataset(tokens, seq_len=16, eos_id=EOS, shuffle=False, loss_mask=mask)
    x, y = ds.rows(np.arange(ds.num_rows))
    pos = np.arange(ds.num_rows)[:, None] * 16 + np.arange(1, 17)          # stream index of each target
    expect = np.where((mask[pos] == 0) | (x.numpy() == EOS), IGNORE, tokens[pos].astype(np.int64))
    assert np.array_equal(y.numpy(), expect)
    with pytest.raises(ValueError, match="loss_mask shape"):
        PackedDataset(tokens, 16, EOS, loss_mask=mask[:-1])


def test_mixture_is_a_weighted_deterministic_cycle():
    from nemotron3.train.data import Mixture
    short = PackedDataset(_stream(400, 1), seq_len=8, eos_id=EOS, seed=1)
    long = PackedDataset(_stream(400, 2), seq_len=64, eos_id=EOS, seed=2)
    mix = Mixture([(short, 4, 2), (long, 1, 1)])
    assert mix.cycle == [0, 1, 0]                                   # slots at 1/4, 3/4 (short) and 1/2 (long)
    located = [mix.locate(k) for k in range(9)]
    assert located == [(0, 0), (1, 0), (0, 1), (0, 2), (1, 1), (0, 3), (0, 4), (1, 2), (0, 5)]
    for k, (i, j) in enumerate(located):                           # each component's steps in order, none skipped
        ds, b, _ = mix.components[i]
        x, y = mix.batch(k)
        assert x.shape == (b, ds.seq_len)
        assert torch.equal(x, ds.batch(j, b)[0])
    assert mix.steps_per_epoch() == min(short.steps_per_epoch(4) * 3 // 2, long.steps_per_epoch(1) * 3)
    with pytest.raises(ValueError, match="positive integers"):
        Mixture([(short, 4, 0)])

"""SFT data: token-exact rendering, assistant-only loss mask, masked forced </think>, all modes present."""
import random
from pathlib import Path

import numpy as np
import pytest

from nemotron3.train.envs import get_env
from nemotron3.train.sft import build_sft_data, encode_conversation, sft_example
from nemotron3.tokenizer import load_tokenizer

PICO = Path(__file__).resolve().parent.parent / "models" / "pico"


def test_segments_encode_exactly_and_mask_only_assistant_turns():
    tok = load_tokenizer(PICO)
    rng = random.Random(0)
    im_end, think_close = tok.token_to_id("<|im_end|>"), tok.token_to_id("</think>")
    for name in ("calc", "code", "format"):
        env = get_env(name)
        for i, mode in enumerate(["think", "off", "budget", "medium"]):
            task = env.task("train", i)
            msgs, thinking, forced = sft_example(env, task, mode, rng)
            conv = list(task.messages) + msgs
            ids, mask = encode_conversation(tok, conv, task.tools, thinking, {len(task.messages) + j for j in forced})
            text = tok.apply_chat_template(conv, tools=task.tools, add_generation_prompt=False, tokenize=False,
                                           enable_thinking=thinking)
            assert ids == tok.encode(text)                                    # same tokens as one encode
            learned = tok.decode([t for t, m in zip(ids, mask) if m])
            n_turns = sum(m["role"] == "assistant" for m in conv)
            assert sum(t == im_end and m for t, m in zip(ids, mask)) == n_turns   # every turn's end is learned
            assert "<|im_start|>" not in learned and "<tool_response>" not in learned
            assert task.messages[-1]["content"] not in learned                    # the prompt is not learned
            closes = [m for t, m in zip(ids, mask) if t == think_close]
            if mode == "budget" and thinking and forced:
                assert closes[0] == 0 and all(closes[1:])                          # only the forced close is masked
            elif mode != "off":
                assert all(closes)


def test_build_sft_data_writes_aligned_streams(tmp_path):
    stats = build_sft_data(tmp_path, PICO, envs=["calc", "format"], train_per_env=6, val_per_env=2, seed=1)
    for split in ("train", "val"):
        t, m = np.load(tmp_path / f"{split}.tokens.npy"), np.load(tmp_path / f"{split}.mask.npy")
        assert t.shape == m.shape and stats[split]["tokens"] == len(t)
        assert 0 < m.sum() < len(m) and stats[split]["assistant_tokens"] == int(m.sum())
    assert sum(stats["train"]["modes"].values()) == 12


def test_copy_task_learns_only_the_repeated_span():
    from nemotron3.train.data import copy_task_stream
    corpus = np.arange(1000, 6000, dtype=np.int64)          # distinct ids: a repeat is recognisable
    t, m = copy_task_stream(corpus, rows=8, seq_len=64, seed=3)
    assert len(t) == len(m) == 8 * 64 + 1 and m.sum() > 0
    for i in np.nonzero(m)[0]:
        # a learned token continues a run that already appeared earlier in the row stream, token for token
        first = np.nonzero(t[:i] == t[i - 1])[0]
        assert len(first) and t[first[0] + 1] == t[i]
    assert not m[t == 0].any()
    with pytest.raises(ValueError, match="240 tokens"):
        copy_task_stream(corpus[:100], rows=2, seq_len=64)


def test_copy_task_random_spans():
    """span_ids: every copied span is drawn from the id range (not the text), its repeat is learned, the filler
    between them is text."""
    from nemotron3.train.data import copy_task_stream
    text = np.full(5000, 7, dtype=np.int64)                   # a one-token "text": filler is all 7s
    t, m = copy_task_stream(text, rows=6, seq_len=64, seed=1, span_ids=(100, 10**6))
    assert m.sum() > 0
    assert ((t == 7) | (t >= 100)).all()
    assert (t[m == 1] >= 100).all()                            # only span tokens are learned
    for i in np.nonzero(m)[0]:
        # the learned token is the successor of the previous occurrence of the token before it
        prev = np.nonzero(t[:i - 1] == t[i - 1])[0]
        assert len(prev) and t[prev[-1] + 1] == t[i]
    t2, _ = copy_task_stream(text, rows=6, seq_len=64, seed=1)
    assert (t2 == 7).all()
    # fixed lengths, no filler: blocks [s, s] of 2 x 16 tokens, learned from the 2nd token of the repeat on
    t3, m3 = copy_task_stream(text, rows=4, seq_len=32, seed=2, span_ids=(100, 10**6), span_len=(16, 17),
                              filler_len=(0, 1))
    blocks = t3[:128].reshape(4, 32)
    assert (blocks[:, :16] == blocks[:, 16:]).all() and (blocks >= 100).all()
    assert (m3[:128].reshape(4, 32) == np.r_[np.zeros(17), np.ones(15)]).all()
    with pytest.raises(ValueError, match="span_len"):
        copy_task_stream(text, rows=1, seq_len=32, span_len=(1, 5))


def test_sft_recipe_mixes_in_the_copy_component(tmp_path):
    """`sft.copy` is a copy data component appended to the SFT mixture (with the SFT seed unless it sets one)."""
    from nemotron3.train.recipe import load_recipe
    from nemotron3.train.sft import RECIPE, sft_recipe
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.mask.npy").write_bytes(b"")        # data "already built": nothing is generated
    over = {"out_dir": str(tmp_path), "data.seq_len": 64, "data.tokenizer_dir": "unused", "train.batch_size": 2,
            "sft.seed": 5}
    assert len(sft_recipe(load_recipe(None, over, RECIPE))["data"]["mix"]) == 1
    over["sft.copy"] = {"spans": "random", "rows": 10, "seq_len": 32, "batch_size": 4, "weight": 1}
    mix = sft_recipe(load_recipe(None, over, RECIPE))["data"]["mix"]
    assert mix[1] == {"seed": 5, "spans": "random", "rows": 10, "seq_len": 32, "batch_size": 4, "weight": 1,
                      "source": "copy"}
    assert mix[0]["weight"] == 2 and mix[0]["mask"].endswith("train.mask.npy")

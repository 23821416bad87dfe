"""Byte-level BPE tokenizer: fixed special ids, exact round-trip, transformers parity."""

import json
import random
import sysconfig
from pathlib import Path

import pytest

from nemotron3.chat import CHAT_TEMPLATE
from nemotron3.train.corpus import build_corpus, iter_documents
from nemotron3.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = [STDLIB / p for p in ("json", "textwrap.py", "colorsys.py", "keyword.py", "string.py")]
VOCAB = 400

SAMPLES = [
    "",
    "hello world",
    "  leading and trailing spaces  \n\n\t\ttabs\r\nCRLF\rCR",
    "def f(x):\n    return {'a': [1, 2.5e-3, None]}  # comment\n",
    "h\u00e9llo w\u00f6rld \u4e16\u754c \U0001f916 \u0645\u0631\u062d\u0628\u0627 \u00a0nbsp \u200bzwsp e\u0301",
    "\x00\x01\x7f control \ufeff bom \U0010ffff",
    "<s>literal</s> <|im_start|>user\nhi<|im_end|>\n<think>\n</think> <tool_call>",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    build_corpus(root / "corpus", sources=SMALL)
    train_tokenizer((d["text"] for d in iter_documents(root / "corpus")), VOCAB, root / "model")
    return root / "model"


def _random_texts(n=100, seed=0):
    rng = random.Random(seed)
    pools = [(0x20, 0x7E), (0x0, 0x7F), (0xA0, 0x2FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xE000, 0xFFFD)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 40))))
    return out


def test_special_tokens_fixed_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.vocab_size == VOCAB == len(tok)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(12))
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.special_ids == frozenset(range(12)) and tok.special_tokens["<|im_end|>"] == 5
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t) == [i]
        assert tok.decode([i]) == t
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 4 and ids[-1] == 5 and 4 not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_round_trip_exact(tok_dir):
    tok = load_tokenizer(tok_dir)
    for text in SAMPLES + _random_texts():
        for parse_special in (True, False):
            ids = tok.encode(text, parse_special=parse_special)
            assert tok.decode(ids) == text
            assert tok.unk_id not in ids
    code = (STDLIB / "textwrap.py").read_text()
    assert tok.decode(tok.encode(code)) == code
    assert len(tok.encode(code)) < 0.6 * len(code.encode())  # merges actually compress


def test_raw_text_mode_never_emits_control_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = SAMPLES[-1]
    assert not set(tok.encode(text, parse_special=False)) & tok.special_ids
    assert {1, 2, 4, 5, 6, 7, 8} <= set(tok.encode(text))
    assert tok.encode_batch([text, "x"], parse_special=False) == [tok.encode(text, False), tok.encode("x", False)]


def test_training_is_deterministic_and_config_saved(tok_dir, tmp_path):
    texts = [d["text"] for d in iter_documents(tok_dir.parent / "corpus")]
    again = train_tokenizer(texts, VOCAB, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert load_tokenizer(tmp_path).fingerprint == load_tokenizer(tok_dir).fingerprint
    assert again.get_vocab_size() == VOCAB
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == ("<s>", "</s>", "<pad>", "<unk>")
    assert [cfg["added_tokens_decoder"][str(i)]["content"] for i in range(12)] == list(SPECIAL_TOKENS)
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], 100)


def test_transformers_parity(tok_dir):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tok_dir)
    hf_auto = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    hf_file = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    assert (hf_auto.bos_token_id, hf_auto.eos_token_id, hf_auto.pad_token_id, hf_auto.unk_token_id) == (1, 2, 3, 0)
    assert len(hf_auto) == VOCAB
    for text in SAMPLES + _random_texts(30, seed=1) + [(STDLIB / "colorsys.py").read_text()]:
        ids = tok.encode(text)
        assert hf_auto.encode(text) == ids
        assert hf_auto(text)["input_ids"] == ids
        assert hf_file.encode(text) == ids
        assert hf_auto(text, split_special_tokens=True)["input_ids"] == tok.encode(text, parse_special=False)
        assert hf_auto.decode(ids) == tok.decode(ids) == text
        assert hf_auto.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)

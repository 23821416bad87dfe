"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with Nemotron 3 control tokens.

Design decisions:

* Byte-level BPE (GPT-2 style pre-tokenizer regex, ``add_prefix_space=False``, no
  normaliser, all 256 byte symbols in the base alphabet) so that *any* string
  round-trips exactly and ``<unk>`` is never produced.
* Control tokens are reserved at fixed low ids (see :data:`SPECIAL_TOKENS`), all marked
  ``special`` so ``decode(..., skip_special_tokens=True)`` drops them like ``transformers``
  does, and so raw corpus text can be encoded with ``parse_special=False`` (a literal
  ``"<s>"`` in some source file must not become BOS).
* No post-processor: ``encode`` never adds BOS/EOS; callers add them explicitly.
* Saved as ``tokenizer.json`` + HF-style ``tokenizer_config.json`` (with the chat
  template), loadable by ``transformers.AutoTokenizer`` with identical ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from .chat.template import CHAT_TEMPLATE, render_chat

SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>",  # 0..3: unk, bos, eos, pad
    "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
)
UNK, BOS, EOS, PAD = SPECIAL_TOKENS[:4]


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub_surrogates(text: str) -> str:
    """Unpaired UTF-16 halves (JSON allows them, UTF-8 does not) become U+FFFD, as vLLM's detokenizer does."""
    return LONE_SURROGATE.sub("\ufffd", text)


def encode_text(tok, text: str) -> list[int]:
    """Token ids of `text` with no BOS/EOS, for our :class:`Tokenizer` or a ``transformers`` tokenizer alike.
    The one place prompt text becomes ids (engine, server, terminal chat and rollouts all call it)."""
    if not isinstance(text, str):
        raise TypeError(f"text to tokenize must be a str, got {type(text).__name__}")
    text = scrub_surrogates(text)
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:                     # our Tokenizer.encode takes no add_special_tokens: it never adds BOS
        return list(tok.encode(text))


def _added_token(content: str):
    from tokenizers import AddedToken

    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, out_dir: str | os.PathLike | None = None,
                    *, min_frequency: int = 2, model_max_length: int = 4096,
                    chat_template: str = CHAT_TEMPLATE):
    """Train on ``texts`` and (if ``out_dir``) save; returns the ``tokenizers.Tokenizer``.

    Training is deterministic for a given text stream. ``vocab_size`` includes the 12
    control tokens and the 256 byte symbols, so it must be >= 268.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[_added_token(t) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    if out_dir is not None:
        save_tokenizer(tok, out_dir, model_max_length=model_max_length, chat_template=chat_template)
    return tok


def tokenizer_config(model_max_length: int = 4096, chat_template: str = CHAT_TEMPLATE) -> dict:
    """HF ``tokenizer_config.json`` contents."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # keep decode byte-exact in transformers too
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "chat_template": chat_template,
    }


def save_tokenizer(tok, out_dir: str | os.PathLike, **config_kwargs) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = tokenizer_config(**config_kwargs)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids and chat template we need."""

    def __init__(self, tok, config: dict | None = None):
        self._tok = tok
        self._raw = tok.__class__.from_str(tok.to_str())  # copy that treats specials as text
        self._raw.encode_special_tokens = True
        self.config = config or tokenizer_config()
        template = self.config.get("chat_template")     # the checkpoint's own template wins over ours
        self.chat_template: str = template if isinstance(template, str) and template else CHAT_TEMPLATE
        self.fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()  # identifies the vocab/merges
        self.special_tokens: dict[str, int] = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.special_ids: frozenset[int] = frozenset(self.special_tokens.values())
        self.bos_id, self.eos_id = self.special_tokens[BOS], self.special_tokens[EOS]
        self.pad_id, self.unk_id = self.special_tokens[PAD], self.special_tokens[UNK]
        self.im_start_id, self.im_end_id = self.special_tokens["<|im_start|>"], self.special_tokens["<|im_end|>"]

    @property
    def backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` underneath (transformers' fast tokenizers have the same property)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Ids without BOS/EOS. ``parse_special=False`` encodes control-token strings as
        plain text (use for corpus documents; = ``split_special_tokens=True`` in HF)."""
        return (self._tok if parse_special else self._raw).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], parse_special: bool = True) -> list[list[int]]:
        encs = (self._tok if parse_special else self._raw).encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(int(idx))

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False, **kwargs: Any):
        """Render with the saved template (``enable_thinking``, ``truncate_history_thinking``
        pass through ``kwargs``); returns the string, or ids if ``tokenize``."""
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            kwargs.setdefault(name, self.config.get(name))
        text = render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           chat_template=self.chat_template, **kwargs)
        return self.encode(text) if tokenize else text


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` if present) from ``model_dir``."""
    from tokenizers import Tokenizer as HFTokenizer

    d = Path(model_dir)
    raw = (d / "tokenizer.json").read_text(encoding="utf-8")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else None
    template = checkpoint_chat_template(d, cfg)
    if template is not None:
        cfg = {**(cfg or tokenizer_config()), "chat_template": template}
    return Tokenizer(HFTokenizer.from_str(raw), cfg)


def checkpoint_chat_template(model_dir: str | os.PathLike, cfg: dict | None = None) -> str | None:
    """The checkpoint's own chat template, picked as ``transformers`` picks it: ``chat_template.jinja``
    first, then ``tokenizer_config.json``'s ``chat_template`` (a string, or the legacy list of
    ``{"name", "template"}`` whose ``default`` entry is used). None when it ships none (our default applies)."""
    f = Path(model_dir) / "chat_template.jinja"
    if f.exists():
        return f.read_text(encoding="utf-8")
    t = (cfg or {}).get("chat_template")
    if isinstance(t, list):
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None

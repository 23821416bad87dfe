"""Supervised fine-tuning: `python -m nemotron3.train.sft RECIPE.json [--resume] [--max-steps N] [--set k=v]`.

The data are the environments' reference episodes (train split only; train/envs), rendered with the model's
chat template exactly as the engine renders prompts, in the mix Nemotron 3's SFT uses at our scale
(recipes.md §4; the shares are the recipe's `sft.modes`):

* `think`    - full reasoning trace in every assistant turn (tool calls, tool results, final answer);
* `off`      - reasoning off: the prompt's `<think></think>` (enable_thinking=False), answer only;
* `budget`   - a trace cut after a random share of its words with `</think>` inserted: the model learns to
               answer after a forced close (what the engine's thinking budget does); the inserted `</think>`
               is masked from the loss so the model never learns to stop thinking early on its own;
* `medium`   - a short "medium-effort" trace: the first sentence of each reasoning only.

Loss is on assistant tokens only: everything after `<|im_start|>assistant\\n` up to and including `<|im_end|>`.
Conversations are packed into rows of seq_len, separated by EOS (cross-conversation targets masked, as in
pretraining). Every segment boundary sits next to a special token, so encoding the segments one by one gives
exactly the tokens of encoding the whole rendering (tested).

Training itself is the pretraining loop (pretrain.train) on a `.npy` token stream with a loss mask, started
from `init` (the long-context-extended base); LM + MTP loss, MoE balancing as in pretraining. The recipe is
pretraining's plus an `sft` section (SFT_DEFAULTS; `sft.copy` is a data component).
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np

from ..tokenizer import load_tokenizer
from .recipe import PRETRAIN, stage_parser, train_stage

ASSISTANT, END, THINK_CLOSE = "<|im_start|>assistant\n", "<|im_end|>", "</think>"
SFT_DEFAULTS = dict(envs=["calc", "code", "format"], train_per_env=600, val_per_env=30, seed=0,
                    modes={"think": 0.5, "off": 0.2, "budget": 0.15, "medium": 0.15},
                    copy=None)
RECIPE = PRETRAIN.extend({"sft": SFT_DEFAULTS}, components=("sft.copy",))


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.strip(), re.S)
    return m.group(1) if m else text.strip()


def sft_example(env, task, mode: str, rng: random.Random) -> tuple[list[dict], bool, set[int]]:
    """(conversation continuation, enable_thinking, indices of assistant turns whose `</think>` was forced)."""
    msgs = [dict(m) for m in env.reference(task, rng, thinking=mode != "off")]
    forced = set()
    for i, m in enumerate(msgs):
        r = m.get("reasoning_content") or ""
        if m["role"] != "assistant" or not r.strip():
            continue
        if mode == "medium":
            m["reasoning_content"] = _first_sentence(r)
        elif mode == "budget" and not forced:      # cut the first trace only
            words = r.split()
            m["reasoning_content"] = " ".join(words[:rng.randint(1, max(1, len(words) - 1))])
            forced.add(i)
    return msgs, mode != "off", forced


def encode_conversation(tok, messages: list[dict], tools, thinking: bool, forced_turns=()) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = assistant token to learn) of one rendered conversation."""
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=False, tokenize=False,
                                   enable_thinking=thinking)
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    forced = {assistant_idx.index(i) for i in forced_turns}
    ids, mask, pos, turn = [], [], 0, 0

    def add(segment: str, learn: int):
        if segment:
            t = tok.encode(segment)
            ids.extend(t)
            mask.extend([learn] * len(t))

    while True:
        start = text.find(ASSISTANT, pos)
        if start < 0:
            add(text[pos:], 0)
            break
        start += len(ASSISTANT)
        end = text.index(END, start) + len(END)
        add(text[pos:start], 0)
        body = text[start:end]
        cut = body.find(THINK_CLOSE) if turn in forced else -1
        if cut >= 0:
            add(body[:cut], 1)
            add(THINK_CLOSE, 0)
            add(body[cut + len(THINK_CLOSE):], 1)
        else:
            add(body, 1)
        pos, turn = end, turn + 1
    return ids, mask


def build_sft_data(out_dir, tokenizer_dir, envs=SFT_DEFAULTS["envs"], train_per_env=600, val_per_env=30,
                   seed=0, modes=None) -> dict:
    """Write {train,val}.tokens.npy + .mask.npy (+ samples.jsonl to read) into out_dir; returns stats."""
    from .envs import get_env
    modes = modes or SFT_DEFAULTS["modes"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer_dir)
    rng = random.Random(seed)
    names, weights = list(modes), list(modes.values())
    stats = {}
    samples = []
    for split, n in (("train", train_per_env), ("val", val_per_env)):
        ids, mask, count = [], [], {}
        for name in envs:
            env = get_env(name)
            # SFT validation uses train-split tasks past the training ones: the env's test split stays unseen
            start = 0 if split == "train" else train_per_env
            for task in env.tasks("train", n, start=start):
                mode = rng.choices(names, weights)[0]
                msgs, thinking, forced = sft_example(env, task, mode, rng)
                conv = list(task.messages) + msgs
                t, m = encode_conversation(tok, conv, task.tools, thinking, {len(task.messages) + i for i in forced})
                ids += t + [tok.eos_id]
                mask += m + [0]
                count[mode] = count.get(mode, 0) + 1
                if split == "train" and len(samples) < 12:
                    samples.append({"env": name, "mode": mode, "text": tok.decode(t)})
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
        np.save(out / f"{split}.tokens.npy", np.asarray(ids, dtype=dtype), allow_pickle=False)
        np.save(out / f"{split}.mask.npy", np.asarray(mask, dtype=np.uint8), allow_pickle=False)
        stats[split] = {"tokens": len(ids), "assistant_tokens": int(sum(mask)), "modes": count}
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def sft_recipe(recipe: dict) -> dict:
    """Fill `data` from `sft`: build the data when missing, point the trainer's mixture and val at it."""
    s = recipe["sft"]
    data_dir = Path(recipe["out_dir"]) / "data"
    if not (data_dir / "val.mask.npy").exists():
        stats = build_sft_data(data_dir, recipe["data"]["tokenizer_dir"], s["envs"], s["train_per_env"],
                               s["val_per_env"], s["seed"], s["modes"])
        print(f"SFT data: {json.dumps(stats)}", file=sys.stderr)
    T = recipe["data"]["seq_len"]
    recipe["data"]["mix"] = [{"source": str(data_dir / "train.tokens.npy"), "mask": str(data_dir / "train.mask.npy"),
                              "seq_len": T, "batch_size": recipe["train"]["batch_size"], "weight": 2}]
    if s["copy"]:       # a "copy" data component (data.build_component) that keeps the copying skill alive
        recipe["data"]["mix"].append({"seed": s["seed"], **s["copy"], "source": "copy"})
    recipe["data"]["val"] = {"source": str(data_dir / "val.tokens.npy"), "mask": str(data_dir / "val.mask.npy"),
                             "seq_len": T}
    return recipe


def main(argv=None):
    from .pretrain import train
    ap = stage_parser("python -m nemotron3.train.sft", __doc__)
    train_stage(ap, ap.parse_args(argv), RECIPE, train, prepare=sft_recipe)


if __name__ == "__main__":
    main()

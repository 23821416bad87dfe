"""Minimal greedy generation over a HybridCache (the engine in `nemotron3.engine` supersedes it for serving).

Prefill the prompt in one forward, then decode one token per step with the recurrent Mamba update and
the KV cache: per-step cost is constant in the Mamba layers and linear in the context only in the few
attention layers.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from .model import HybridCache, NemotronHForCausalLM


@torch.inference_mode()
def greedy_ids(model: NemotronHForCausalLM, prompt: list[int], max_tokens: int,
               stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield greedy token ids after `prompt` until a stop id (not yielded) or `max_tokens`."""
    if max_tokens <= 0:
        return
    stop = set(stop_ids)
    cache = HybridCache(model.config, 1, len(prompt) + max_tokens, dtype=model.dtype, device=model.device)
    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    logits = model(ids, cache)[:, -1]
    for _ in range(max_tokens):
        nxt = int(logits.argmax(-1))
        if nxt in stop:
            return
        yield nxt
        logits = model(torch.tensor([[nxt]], device=model.device), cache)[:, -1]


def greedy_generate(model, prompt: list[int], max_tokens: int, stop_ids: Iterable[int] = (),
                    decode: Callable[[list[int]], str] | None = None) -> Iterator[str]:
    """Yield decoded text pieces as they become complete characters (holds back partial UTF-8)."""
    out, shown = [], ""
    for t in greedy_ids(model, prompt, max_tokens, stop_ids):
        out.append(t)
        text = decode(out)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
    if decode is not None and decode(out) != shown:
        yield decode(out)[len(shown):]

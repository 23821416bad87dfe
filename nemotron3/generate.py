"""Single-prompt generation for the CLI, on top of the engine (`nemotron3.engine`).

`generate_ids` streams token ids for one prompt through an `LLMEngine` with one slot (greedy by
default; temperature / seed / repetition penalty / MTP speculation optional); `greedy_generate` keeps the original CLI
signature and yields decoded text pieces as they become complete characters.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from .engine import LLMEngine, SamplingParams
from .model import NemotronHForCausalLM


def generate_ids(model: NemotronHForCausalLM, prompt: list[int], max_tokens: int, stop_ids: Iterable[int] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 num_speculative_tokens: int = 0, repetition_penalty: float = 1.0) -> Iterator[int]:
    """Yield generated token ids after `prompt` until a stop id (not yielded) or `max_tokens`."""
    if max_tokens <= 0:
        return
    stop = set(stop_ids)
    engine = LLMEngine(model, None, max_num_seqs=1, max_model_len=max(len(prompt) + max_tokens,
                                                                      model.config.max_position_embeddings),
                       num_speculative_tokens=num_speculative_tokens, enable_prefix_caching=False)
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens,
                            stop_token_ids=sorted(stop), ignore_eos=True, repetition_penalty=repetition_penalty)
    engine.add_request("generate", list(prompt), params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            for t in c.delta_token_ids:
                if t in stop:
                    return
                yield t


def greedy_ids(model, prompt: list[int], max_tokens: int, stop_ids: Iterable[int] = ()) -> Iterator[int]:
    yield from generate_ids(model, prompt, max_tokens, stop_ids)


def greedy_generate(model, prompt: list[int], max_tokens: int, stop_ids: Iterable[int] = (),
                    decode: Callable[[list[int]], str] | None = None, **sampling) -> Iterator[str]:
    """Yield decoded text pieces as they become complete characters (holds back partial UTF-8).
    `sampling`: temperature, top_p, seed, num_speculative_tokens, repetition_penalty (see `generate_ids`)."""
    out, shown = [], ""
    for t in generate_ids(model, prompt, max_tokens, stop_ids, **sampling):
        out.append(t)
        text = decode(out)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
    if decode is not None and decode(out) != shown:
        yield decode(out)[len(shown):]

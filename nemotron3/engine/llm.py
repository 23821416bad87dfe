"""`LLM`: vLLM's offline batch API over `LLMEngine`, and `load_model`, which turns a path into a model and
its tokenizer.

    llm = LLM("models/pico", num_speculative_tokens=2)
    outs = llm.generate(["def fib(n):", [1, 2, 3]], SamplingParams(temperature=0.8, seed=1, max_tokens=64))
    outs[0].outputs[0].text, outs[0].metrics.ttft, llm.stats()

`generate` checks every prompt and its params (`LLMEngine.check_request`) before it queues any, so a bad one
leaves the engine untouched; `chat` renders conversations with the tokenizer's chat template and hands the
ids to `generate`. Both take one SamplingParams for all prompts or one per prompt (`_params_for`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence as Seq

import torch

from ..model import NemotronHForCausalLM
from ..tokenizer import encode_text
from .engine import LLMEngine
from .outputs import RequestOutput
from .reasoning import MEDIUM_THINKING_BUDGET, ReasoningTokens
from .sampling import SamplingParams


def load_model(model, tokenizer=None, dtype=None, weight_dtype=None) -> tuple[NemotronHForCausalLM, object]:
    """(model, tokenizer) from a checkpoint directory (loaded lazily; `weight_dtype` as `checkpoint.load`) or a
    model object (cast to `dtype` if given; weight_dtype "bfloat16" converts its weights in place, "auto"
    leaves them); the tokenizer comes from `tokenizer` (a path or an object) or else the model directory."""
    from ..checkpoint import load, parse_dtype, parse_weight_dtype
    from ..tokenizer import load_tokenizer
    held = parse_weight_dtype(weight_dtype)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        net = load(path, dtype=dtype, weight_dtype=weight_dtype)
        if tokenizer is None and (path / "tokenizer.json").exists():
            tokenizer = load_tokenizer(path)
    elif isinstance(model, NemotronHForCausalLM):
        net = model
        dt = parse_dtype(dtype)
        if dt is not None and dt != net.dtype:
            net = net.to(dt)
            for mo in net.moe_layers():                     # the router bias stays fp32, as checkpoint.load keeps it
                mo.gate.e_score_correction_bias.data = mo.gate.e_score_correction_bias.float()
        if held == torch.bfloat16:
            from ..quant.linear import store_bf16
            net = store_bf16(net)                       # W16A32: bf16 weights, the model's activation dtype
    else:
        raise ValueError(f"model must be a path or a NemotronHForCausalLM, got {type(model).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return net, tokenizer


def _params_for(sampling_params, n: int, what: str) -> list[SamplingParams]:
    """One SamplingParams per prompt: the given one (or the defaults) for all, or a list of exactly n."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} {what}")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(p).__name__}")
    return params


class LLM:
    """vLLM-style offline API over `LLMEngine`.

    LLM(model_path_or_model, tokenizer=None, max_num_seqs=16, max_model_len=None (config's
    max_position_embeddings), num_speculative_tokens=0, enable_prefix_caching=True, dtype=None,
    fast_decode=True (small-batch decode through `decode_plan.py`'s DecodePlan on fp32 CPU models),
    kv_cache_dtype="auto" | "bfloat16" | "fp8" (vLLM's; auto = the checkpoint's FP8 KV declaration or the
    model dtype), threads=None (the C decode kernel's threads; None = torch's thread count), weight_dtype="auto"
    ('bfloat16': linear, expert, lm_head and embedding weights kept in bf16 with fp32 activations; "auto": that
    for a bf16 checkpoint loaded on CPU, `checkpoint.resolve_weight_dtype`; "float32": fp32 copies), ...)
    """

    def __init__(self, model, tokenizer=None, *, max_num_seqs: int = 16, max_model_len: int | None = None,
                 num_speculative_tokens: int = 0, enable_prefix_caching: bool = True, dtype=None,
                 max_num_batched_tokens: int | None = None, prefix_cache_bytes: int = 256 << 20,
                 block_size: int = 64, seed: int = 0, reasoning_tokens: ReasoningTokens | None = None,
                 medium_thinking_budget: int = MEDIUM_THINKING_BUDGET, fast_decode: bool = True,
                 kv_cache_dtype: str = "auto", threads: int | None = None, weight_dtype="auto"):
        net, tok = load_model(model, tokenizer, dtype, weight_dtype)
        self.engine = LLMEngine(net, tok, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                max_num_batched_tokens=max_num_batched_tokens,
                                num_speculative_tokens=num_speculative_tokens,
                                enable_prefix_caching=enable_prefix_caching, prefix_cache_bytes=prefix_cache_bytes,
                                block_size=block_size, seed=seed, reasoning_tokens=reasoning_tokens,
                                medium_thinking_budget=medium_thinking_budget, fast_decode=fast_decode,
                                kv_cache_dtype=kv_cache_dtype, threads=threads)
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self) -> NemotronHForCausalLM:
        return self.engine.model

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Prompts: one text / token-id list / dict, or a list of them. Returns outputs in prompt order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1) or \
                (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple, torch.Tensor)):
            raise ValueError("prompts must be a text, a list of token ids, a dict, or a list of those; got "
                             f"{type(prompts).__name__}")
        prompts = list(prompts)
        params = _params_for(sampling_params, len(prompts), "prompts")
        eng = self.engine
        for prompt, p in zip(prompts, params):             # validate everything before queueing anything
            eng.check_request(eng.prompt_ids(prompt)[1], p)
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = f"llm-{self._counter}"
                self._counter += 1
                eng.add_request(rid, prompt, p)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                eng.cancel(rid)
            raise
        final: dict[str, RequestOutput] = {}
        stream, eng.stream = eng.stream, False            # only finished requests need an output
        try:
            while len(final) < len(ids):
                for out in eng.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            eng.stream = stream
        return [final[r] for r in ids]

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             chat_template_kwargs: dict | None = None, tools: list | None = None) -> list[RequestOutput]:
        """One conversation (a list of {'role', 'content'} dicts) or a list of them, rendered with the
        tokenizer's chat template. `reasoning_mode='off'` renders with `enable_thinking=False`."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        if not isinstance(messages, (list, tuple)):
            raise ValueError("messages must be a list of {'role', 'content'} dicts (or a list of such lists), "
                             f"got {type(messages).__name__}")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        for i, conv in enumerate(convs):
            if not isinstance(conv, (list, tuple)) or not conv or not all(isinstance(m, dict) for m in conv):
                raise ValueError(f"conversation {i} must be a non-empty list of {{'role', 'content'}} dicts")
        params = _params_for(sampling_params, len(convs), "conversations")
        prompts = []
        for conv, p in zip(convs, params):
            kw = dict(chat_template_kwargs or {})
            if p.reasoning_mode == "off":
                kw.setdefault("enable_thinking", False)
            text = self.tokenizer.apply_chat_template(conv, tools=tools, add_generation_prompt=True,
                                                      tokenize=False, **kw)
            prompts.append({"prompt_token_ids": encode_text(self.tokenizer, text)})
        return self.generate(prompts, params)

    def stats(self) -> dict:
        e = self.engine
        d = dict(vars(e.stats))
        d["spec_acceptance_rate"] = e.stats.spec_acceptance_rate
        d["spec_mean_accepted_length"] = e.stats.spec_mean_accepted_length
        if e.prefix_cache is not None:
            pc = e.prefix_cache
            d["prefix_cache"] = dict(vars(pc.stats), entries=len(pc), bytes=pc.bytes, max_bytes=pc.max_bytes,
                                     hit_rate=pc.stats.hit_rate)
        d["cache_bytes"] = e.cache.nbytes()
        d["slot_bytes_at_max_len"] = e.cache.slot_nbytes(e.max_model_len)
        return d

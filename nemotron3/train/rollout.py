"""Multi-turn rollouts through the inference engine, token-exact: `rollout(llm, envs, tasks, n, params)`.

Design decisions:

* **The token sequence is built, never re-tokenized.** An episode's `tokens` are the prompt (the chat template's
  rendering of `task.messages` + generation prompt, encoded), then for every turn the tokens the policy sampled
  (including its closing `<|im_end|>`, mask 1), then - when the turn called tools and turns remain - the template's
  rendering of the tool messages followed by the next generation prompt (mask 0). The policy is trained on exactly
  the ids it sampled (re-tokenizing its text could merge or split tokens differently), and the scaffolding is
  exactly what `LLM.chat` would have fed it.
* The tool/generation-prompt suffix is found by rendering the conversation with and without it and taking the
  difference (`template_suffix`); the template is prefix-stable across tool messages (tool turns are not `user`
  turns, so `truncate_history_thinking` does not rewrite history) and asserted so. Special tokens are atomic in
  the tokenizer, and the suffix starts right after the generated `<|im_end|>`, so encoding the suffix alone gives
  the same ids as encoding the whole rendering (tested).
* **All unfinished episodes advance together**: one `llm.generate` call per turn over every open episode
  (continuous batching inside the engine; the prefix cache shares a group's common prompt).
* **Seeds**: sample `s` of task `i` at turn `j` uses `seed + 1_000_003 * (i * n + s) + 7919 * j`, so a GRPO group's
  samples differ and the whole rollout is a pure function of (weights, tasks, base seed).
* A turn that ends without `<|im_end|>` (token cap, context cap, or another EOS) ends the episode; its tool calls
  are not executed. `thinking=False` renders with `enable_thinking=False` and decodes with `reasoning_mode='off'`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from ..tokenizer import encode_text as encode
from ..engine.sampling import SamplingParams

IM_END = "<|im_end|>"


@dataclass
class Rollout:
    task: object                 # envs.Task
    group: int                   # index of the task in the call (samples of one task share it)
    tokens: list[int]
    mask: list[int]              # 1 = sampled by the policy (incl. its <|im_end|>), 0 = prompt / tool output
    episode: object              # envs.Episode
    thinking: bool
    sample: int = 0              # index within the group
    prompt_len: int = 0          # tokens of the first prompt
    reasoning_tokens: int = 0    # tokens generated inside <think> (all turns)
    truncated: bool = False      # a turn ended without <|im_end|>

    @property
    def response_tokens(self) -> int:
        return sum(self.mask)


def render(tok, messages, tools, thinking: bool, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                   tokenize=False, enable_thinking=thinking)


def prompt_tokens(tok, task, thinking: bool) -> list[int]:
    """The first prompt, as `LLM.chat` renders it."""
    return encode(tok, render(tok, task.messages, task.tools, thinking, True))


def template_suffix(tok, history: list[dict], new: list[dict], tools, thinking: bool) -> str:
    """Text the template renders after the last assistant turn's `<|im_end|>` for the `new` (tool) messages,
    up to and including the next generation prompt."""
    base = render(tok, history, tools, thinking, False)
    full = render(tok, history + new, tools, thinking, True)
    if not base.endswith(IM_END + "\n") or not full.startswith(base):
        raise ValueError("chat template is not prefix-stable across tool messages")
    return "\n" + full[len(base):]


def _im_end_id(tok) -> int:
    i = tok.token_to_id(IM_END)
    if i is None:
        raise ValueError(f"the tokenizer has no {IM_END} token")
    return i


def rollout(llm, envs: dict, tasks: Sequence, n: int, params: SamplingParams,
            thinking: bool | Sequence[bool] = True, max_total_tokens: int | None = None) -> list[Rollout]:
    """`n` episodes per task (a GRPO group), all advanced turn by turn in batched `llm.generate` calls.

    `params.max_tokens` caps each turn; `max_total_tokens` (default: the engine's max_model_len) caps an
    episode's whole sequence; turns are capped by `env.max_turns`. `thinking` may be one flag or one per task.
    Returns the rollouts in (task, sample) order."""
    from .envs import step as env_step

    tok = llm.tokenizer
    end = _im_end_id(tok)
    cap = min(max_total_tokens or llm.engine.max_model_len, llm.engine.max_model_len)
    flags = [thinking] * len(tasks) if isinstance(thinking, bool) else list(thinking)
    if len(flags) != len(tasks):
        raise ValueError(f"{len(flags)} thinking flags for {len(tasks)} tasks")
    base_seed = params.seed or 0
    eps = []
    for i, task in enumerate(tasks):
        p = prompt_tokens(tok, task, flags[i])
        for s in range(n):
            eps.append(dict(r=Rollout(task, i, list(p), [0] * len(p), None, flags[i], s, len(p)),
                            history=[dict(m) for m in task.messages], raw=[], done=False, turn=0,
                            env=envs[task.env], uid=i * n + s))
    while True:
        for e in eps:
            if not e["done"] and cap - len(e["r"].tokens) < 2:     # no room for another turn
                e["done"] = e["r"].truncated = True
        live = [e for e in eps if not e["done"]]
        if not live:
            break
        prompts, sps = [], []
        for e in live:
            r = e["r"]
            room = cap - len(r.tokens)
            mt = room if params.max_tokens is None else min(params.max_tokens, room)
            sp = dataclasses.replace(params, n=1, max_tokens=mt, seed=base_seed + 1_000_003 * e["uid"] + 7919 * e["turn"],
                                     stop_token_ids=sorted(set(params.stop_token_ids) | {end}), stop=None,
                                     reasoning_mode="off" if not r.thinking else
                                     ("regular" if params.reasoning_mode == "off" else params.reasoning_mode))
            prompts.append({"prompt_token_ids": r.tokens})
            sps.append(sp)
        outs = llm.generate(prompts, sps)
        for e, out in zip(live, outs):
            r, c = e["r"], out.outputs[0]
            ids = list(c.token_ids)
            closed = bool(ids) and ids[-1] == end
            raw = tok.decode(ids[:-1] if closed else ids, skip_special_tokens=False)
            r.tokens += ids
            r.mask += [1] * len(ids)
            r.reasoning_tokens += c.reasoning_tokens
            e["raw"].append(raw)
            e["turn"] += 1
            new, done = env_step(e["env"], r.task, e["history"], raw, r.thinking)
            assistant, tools_msgs = new[:1], new[1:]
            e["history"] += assistant
            if not closed:
                r.truncated, done = True, True
            if e["turn"] >= e["env"].max_turns:
                done = True
            if not done and tools_msgs:
                suffix = encode(tok, template_suffix(tok, e["history"], tools_msgs, r.task.tools, r.thinking))
                if len(r.tokens) + len(suffix) + 1 < cap:
                    r.tokens += suffix
                    r.mask += [0] * len(suffix)
                    e["history"] += tools_msgs
                else:
                    done = True
            elif not tools_msgs:
                done = True
            e["done"] = done
    for e in eps:
        r = e["r"]
        r.episode = e["env"].score(r.task, e["history"][len(r.task.messages):], e["raw"], thinking=r.thinking)
    return [e["r"] for e in eps]


def conversation_text(tok, r: Rollout) -> str:
    """The template's rendering of a finished episode (for checks: equals decode(r.tokens) when the policy's
    text is in the template's canonical form)."""
    return render(tok, r.task.messages + r.episode.messages, r.task.tools, r.thinking, False)

"""Environment API shared by the post-training environments (SFT data, GRPO rollouts, distillation).

A `Task` is a pure function of `(split, index)`. Problems are drawn from a per-`(env, split, index, attempt)`
seeded RNG and assigned to a split by a hash of their problem text (`split_of`: sha256 % 5 == 0 -> "test",
otherwise "train"); a draw whose text hashes to the other split is rejected and redrawn. So no problem text
can ever appear in both splits.

Rollouts: `step(env, task, history, raw)` turns one raw generated assistant turn into messages (the assistant
message, plus one tool message per call while the turn budget allows) and says whether the episode is done;
`env.score(task, continuation, raw_turns)` grades the finished episode.

Reward rule (`reward_for`): 1.0 if the final answer verifies, else 0.0; minus 0.5 if any *penalised* format
error occurred (`unclosed_think`, `bad_tool_call`, `unknown_tool`); floored at -0.5. The other recorded
errors (`no_answer`, `too_many_turns`, `tool_in_answer_turn`) are diagnostics: they cost nothing beyond the
lost correctness.
"""
from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from ...chat.parsers import CALL_OPEN, THINK_CLOSE, THINK_OPEN, parse_output

SPLITS = ("train", "test")
FORMAT_ERRORS = ("unclosed_think", "bad_tool_call", "unknown_tool", "no_answer", "too_many_turns",
                 "tool_in_answer_turn")
PENALISED_ERRORS = frozenset({"unclosed_think", "bad_tool_call", "unknown_tool"})
FORMAT_PENALTY = 0.5
MIN_REWARD = -0.5


@dataclass
class Task:
    env: str
    split: str
    index: int
    messages: list[dict]
    tools: list[dict] | None
    answer: Any
    meta: dict = field(default_factory=dict)


@dataclass
class Episode:
    task: Task
    messages: list[dict]
    correct: bool
    reward: float
    format_errors: list[str]
    turns: int


def split_of(problem_text: str) -> str:
    """The split a problem belongs to: "test" when sha256(text) % 5 == 0, else "train"."""
    h = int.from_bytes(hashlib.sha256(problem_text.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 5 == 0 else "train"


def reward_for(correct: bool, format_errors: list[str]) -> float:
    """1.0 / 0.0 for correctness, minus 0.5 for any of unclosed_think / bad_tool_call / unknown_tool,
    floored at -0.5."""
    r = 1.0 if correct else 0.0
    if PENALISED_ERRORS.intersection(format_errors):
        r -= FORMAT_PENALTY
    return max(MIN_REWARD, r)


def tool_call_message(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_name_args(call: dict) -> tuple[str, dict]:
    fn = call.get("function", call)
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        import json
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            args = {}
    return fn.get("name", ""), args if isinstance(args, dict) else {}


class Env:
    """Base class. Subclasses set `name`, `max_turns`, `tool_schemas` and implement `_draw` (a problem from
    an RNG), `_finish` (ground truth), `verify` and `reference`."""

    name: str = ""
    max_turns: int = 1
    tool_schemas: list[dict] | None = None

    def __init__(self):
        self._cache: dict[tuple[str, int], Task] = {}

    # ---- tasks ------------------------------------------------------------------------------------------
    def _draw(self, rng: random.Random) -> dict:
        """A problem: {"text": user message, ...} (whatever `_finish` needs)."""
        raise NotImplementedError

    def _finish(self, split: str, index: int, problem: dict) -> Task:
        raise NotImplementedError

    def problem(self, split: str, index: int) -> dict:
        """The problem behind `task(split, index)` without computing its ground truth (cheap)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be an integer >= 0, got {index!r}")
        for attempt in range(10_000):
            rng = random.Random(f"{self.name}:{split}:{index}:{attempt}")
            p = self._draw(rng)
            if split_of(p["text"]) == split:
                return p
        raise RuntimeError("could not draw a problem for this split")   # pragma: no cover

    def task(self, split: str, index: int) -> Task:
        key = (split, index)
        if key not in self._cache:
            self._cache[key] = self._finish(split, index, self.problem(split, index))
        return copy.deepcopy(self._cache[key])

    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        return [self.task(split, i) for i in range(start, start + n)]

    # ---- tools, verification, reference -----------------------------------------------------------------
    @property
    def tool_names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tool_schemas or []}

    def tool_result(self, task: Task, name: str, arguments: dict) -> str:
        return f"error: unknown tool {name!r} (this task has no tools)"

    def verify(self, task: Task, answer_text: str) -> bool:
        raise NotImplementedError

    def reference(self, task: Task, rng: random.Random, thinking: bool = True) -> list[dict]:
        raise NotImplementedError

    # ---- grading ----------------------------------------------------------------------------------------
    def score(self, task: Task, messages: list[dict], raw_turns: list[str],
              thinking: bool | None = None) -> Episode:
        """Grade an episode. `messages`: the continuation of `task.messages` (assistant + tool messages);
        `raw_turns`: the raw generated text of each assistant turn (after the generation prompt).
        `thinking` (whether the prompts opened `<think>`) is inferred when None: on if any assistant message
        carries reasoning or any raw turn contains `</think>`.

        Errors: `unclosed_think` (thinking on and a raw turn lacks `</think>`, or a `<think>` opened in the
        raw text is never closed), `bad_tool_call` (a `<tool_call>` that does not parse, or only by recovering
        missing closing tags), `unknown_tool` (a call to a tool the task does not offer), `no_answer` (the final assistant content is empty),
        `too_many_turns` (more assistant turns than `max_turns`, or the budget ran out on a tool call),
        `tool_in_answer_turn` (the final assistant turn calls tools). See `reward_for` for the reward."""
        assistants = [m for m in messages if m.get("role") == "assistant"]
        if thinking is None:
            thinking = any((m.get("reasoning_content") or "").strip() for m in assistants) or \
                any(THINK_CLOSE in r for r in raw_turns)
        errors: list[str] = []

        def add(e):
            if e not in errors:
                errors.append(e)

        for raw in raw_turns:
            if thinking and THINK_CLOSE not in raw:
                add("unclosed_think")
            elif not thinking and raw.lstrip().startswith(THINK_OPEN) and THINK_CLOSE not in raw:
                add("unclosed_think")
            n_open = raw.count(CALL_OPEN)
            if n_open:
                parsed = parse_output(raw, thinking=thinking, tools=task.tools)
                if CALL_OPEN in parsed.content or len(parsed.tool_calls) < n_open or \
                        not all(c.well_formed for c in parsed.tool_calls):
                    add("bad_tool_call")
        allowed = {t["function"]["name"] for t in task.tools or []}
        for m in assistants:
            for call in m.get("tool_calls") or []:
                if _call_name_args(call)[0] not in allowed:
                    add("unknown_tool")
            if CALL_OPEN in (m.get("content") or ""):
                add("bad_tool_call")
        final = assistants[-1] if assistants else {}
        answer = (final.get("content") or "").strip()
        if len(assistants) > self.max_turns or (final.get("tool_calls") and len(assistants) >= self.max_turns):
            add("too_many_turns")
        if final.get("tool_calls"):
            add("tool_in_answer_turn")
        if not answer:
            add("no_answer")
        correct = bool(answer) and self.verify(task, answer)
        return Episode(task=task, messages=messages, correct=correct, reward=reward_for(correct, errors),
                       format_errors=errors, turns=len(assistants))


def step(env: Env, task: Task, history: list[dict], raw: str, thinking: bool = True) -> tuple[list[dict], bool]:
    """Advance an episode by one raw assistant turn (the text generated after the generation prompt:
    reasoning, `</think>`, then content and/or tool calls; no final `<|im_end|>`).

    Returns `(new_messages, done)`: the assistant message (`content`, `reasoning_content`, `tool_calls` with
    dict arguments) and, when it called tools and the turn budget (`env.max_turns`, counted over the
    assistant messages in `history` plus this one) allows another turn, one `tool` message per call with
    `env.tool_result(...)`. `done` is True when the turn made no (well-formed) tool call or the budget is spent.
    """
    d = parse_output(raw, thinking=thinking, tools=task.tools)
    turn = sum(1 for m in history if m.get("role") == "assistant") + 1
    calls = [tool_call_message(f"call_{turn}_{i}", c.name, c.arguments)
             for i, c in enumerate(c for c in d.tool_calls if c.well_formed)]
    msg = {"role": "assistant", "content": d.content.strip(), "reasoning_content": d.reasoning.strip()}
    if calls:
        msg["tool_calls"] = calls
    new = [msg]
    if not calls or turn >= env.max_turns:
        return new, True
    for c in calls:
        name, args = _call_name_args(c)
        new.append({"role": "tool", "tool_call_id": c["id"], "name": name,
                    "content": env.tool_result(task, name, args)})
    return new, False


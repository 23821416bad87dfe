"""Procedurally generated, verifiable environments for post-training (SFT data, GRPO, distillation).

* `calc`   (`CalculatorEnv`): arithmetic / unit-conversion word problems with a `calculator` tool.
* `code`   (`CodeEnv`): predict the stdout of a short Python snippet (checked against a run in
  `nemotron3.sandbox`).
* `format` (`FormatEnv`): answer under a verifiable format constraint (JSON, bullets, N words, case).

Every task is a pure function of `(split, index)`; train and test problems never share a problem text
(see `base.split_of`). `step` drives multi-turn rollouts, `Env.score` grades them (see `base.reward_for`).
`DEMO_TOOLS` / `execute_demo_tool` are the tools `nemotron3 chat --tools` offers.
"""
from .base import Env, Episode, Task, reward_for, split_of, step
from .calc import CalculatorEnv, calculate, format_number
from .code import CodeEnv
from .format import FormatEnv
from .tools import DEMO_TOOLS, execute_demo_tool

ENVS: dict[str, type[Env]] = {"calc": CalculatorEnv, "code": CodeEnv, "format": FormatEnv}


def get_env(name: str) -> Env:
    """A fresh environment instance by name ("calc" | "code" | "format")."""
    try:
        return ENVS[name]()
    except KeyError:
        raise ValueError(f"unknown env {name!r} (envs: {', '.join(ENVS)})") from None


__all__ = ["Task", "Episode", "Env", "ENVS", "get_env", "CalculatorEnv", "CodeEnv", "FormatEnv", "calculate",
           "DEMO_TOOLS", "execute_demo_tool", "step", "reward_for", "split_of", "format_number"]

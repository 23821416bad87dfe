"""`code`: predict what a short Python snippet prints. No tools.

Ground truth is the snippet's stdout from `nemotron3.sandbox.run_python` (computed once per task, cached).
Answer extraction: the text after the last `Output:` (case-insensitive) in the final content, or the whole
content when there is none; code fences are dropped. Both sides are normalised (`normalize_output`: lines right-stripped,
leading/trailing blank lines removed) and compared exactly.
"""
from __future__ import annotations

import random
import re

from ...sandbox import run_python
from .base import Env, Task

WORDS = ["cat", "dog", "sun", "tree", "code", "book", "star", "fish", "moon", "lamp", "rain", "bird",
         "python", "apple", "river", "stone", "cloud", "green"]
_OUTPUT = re.compile(r"output\s*:", re.I)
_FENCE = re.compile(r"^```[a-z]*\n?|\n?```$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def normalize_output(text: str) -> str:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n").strip()


def extract_output(content: str) -> str:
    """The predicted output in an answer: after the last "Output:", fences stripped, normalised."""
    m = None
    for m in _OUTPUT.finditer(content):
        pass
    text = content[m.end():] if m else content
    text = _FENCE.sub("", text.strip())
    return normalize_output(text)


def _snippet(rng: random.Random, level: str) -> tuple[list[str], str, str]:
    """(code lines, trace, expected stdout) for one random snippet."""
    if level == "easy":
        if rng.random() < 0.5:
            a, b, c = rng.randint(1, 9), rng.randint(2, 6), rng.randint(1, 9)
            op1, op2 = rng.choice("+*-"), rng.choice("+-")
            y = _OPS[op1](a, b)
            r = _OPS[op2](y, c)
            return ([f"x = {a}", f"y = x {op1} {b}", f"print(y {op2} {c})"],
                    f"x = {a}. y = x {op1} {b} = {y}. print(y {op2} {c}) prints {r}.", f"{r}")
        w, n = rng.choice(WORDS), rng.randint(2, 3)
        kind = rng.randrange(3)
        if kind == 0:
            return ([f's = "{w}"', f"t = s * {n}", "print(t)"], f"s = '{w}'. t = s * {n} = '{w * n}'. "
                    f"print(t) prints {w * n}.", w * n)
        if kind == 1:
            return ([f's = "{w}"', "t = s.upper()", "print(t, len(t))"],
                    f"s = '{w}'. t = '{w.upper()}'. len(t) = {len(w)}. prints {w.upper()} {len(w)}.",
                    f"{w.upper()} {len(w)}")
        v = rng.choice(WORDS)
        return ([f'a = "{w}"', f'b = "{v}"', "print(a + b, len(a + b))"],
                f"a + b = '{w + v}', len = {len(w + v)}. prints {w + v} {len(w + v)}.",
                f"{w + v} {len(w + v)}")
    if level == "medium":
        kind = rng.randrange(3)
        if kind == 0:
            n, k = rng.randint(2, 4), rng.randint(1, 5)
            total, steps = 0, []
            for i in range(n):
                total += i * k
                steps.append(f"i = {i}: total = {total}.")
            return (["total = 0", f"for i in range({n}):", f"    total += i * {k}", "print(total)"],
                    "total = 0. " + " ".join(steps) + f" print(total) prints {total}.", f"{total}")
        if kind == 1:
            xs = [rng.randint(1, 9) for _ in range(3)]
            d = rng.randint(1, 9)
            ys = xs + [d]
            if rng.random() < 0.5:
                return ([f"xs = {xs}", f"xs.append({d})", "print(len(xs), sum(xs))"],
                        f"xs = {xs}. After append xs = {ys}. len(xs) = 4, sum(xs) = {sum(ys)}. "
                        f"prints 4 {sum(ys)}.", f"4 {sum(ys)}")
            return ([f"xs = {xs}", f"xs.append({d})", "print(xs[1:3], max(xs))"],
                    f"xs = {xs}. After append xs = {ys}. xs[1:3] = {ys[1:3]}, max(xs) = {max(ys)}. "
                    f"prints {ys[1:3]} {max(ys)}.", f"{ys[1:3]} {max(ys)}")
        w = rng.choice([x for x in WORDS if len(x) >= 4])
        i = rng.randint(0, 1)
        j = rng.randint(i + 2, len(w))
        t = w[i:j]
        return ([f's = "{w}"', f"t = s[{i}:{j}]", "print(t + s[-1])"],
                f"s = '{w}'. t = s[{i}:{j}] = '{t}'. s[-1] = '{w[-1]}'. prints {t + w[-1]}.", t + w[-1])
    kind = rng.randrange(3)
    if kind == 0:
        n, k, c = rng.randint(2, 4), rng.randint(2, 5), rng.randint(0, 3)
        vals = [i * k + c for i in range(n)]
        trace = " ".join(f"i = {i} prints {v}." for i, v in enumerate(vals))
        return ([f"for i in range({n}):", f"    print(i * {k} + {c})"], trace, "\n".join(map(str, vals)))
    if kind == 1:
        n = rng.randint(3, 30)
        if n % 2 == 0:
            trace = f"n = {n}. {n} % 2 = 0, so the if branch runs. print({n} // 2) prints {n // 2}."
            r = n // 2
        else:
            trace = f"n = {n}. {n} % 2 = 1, so the else branch runs. print({n} * 3 + 1) prints {n * 3 + 1}."
            r = n * 3 + 1
        return ([f"n = {n}", "if n % 2 == 0:", "    print(n // 2)", "else:", "    print(n * 3 + 1)"], trace, f"{r}")
    w = rng.choice(WORDS)
    out, steps = "", []
    for ch in w[:3]:
        out = ch + out
        steps.append(f"ch = '{ch}': out = '{out}'.")
    return ([f'w = "{w}"', 'out = ""', "for ch in w[:3]:", "    out = ch + out", "print(out)"],
            "out = ''. " + " ".join(steps) + f" print(out) prints {out}.", out)


class CodeEnv(Env):
    name = "code"
    max_turns = 1
    tool_schemas = None
    levels = (("easy", 0.4), ("medium", 0.35), ("hard", 0.25))

    def _draw(self, rng: random.Random) -> dict:
        level = rng.choices([lv for lv, _ in self.levels], [w for _, w in self.levels])[0]
        lines, trace, expected = _snippet(rng, level)
        code = "\n".join(lines) + "\n"
        return {"text": f"What does this Python code print?\n```\n{code}```", "code": code, "trace": trace,
                "expected": expected, "difficulty": level}

    def _finish(self, split: str, index: int, p: dict) -> Task:
        r = run_python(p["code"])
        if not r.ok:
            raise RuntimeError(f"code task {split}/{index} failed in the sandbox: {r.text()}")
        out = r.stdout
        return Task(env=self.name, split=split, index=index, messages=[{"role": "user", "content": p["text"]}],
                    tools=None, answer=out, meta={"difficulty": p["difficulty"], "code": p["code"],
                                                  "trace": p["trace"]})

    def verify(self, task: Task, answer_text: str) -> bool:
        return bool(answer_text) and extract_output(answer_text) == normalize_output(task.answer)

    def reference(self, task: Task, rng: random.Random, thinking: bool = True) -> list[dict]:
        out = normalize_output(task.answer)
        content = f"Output:\n{out}" if "\n" in out else f"Output: {out}"
        return [{"role": "assistant", "content": content, "reasoning_content": task.meta["trace"] if thinking else ""}]

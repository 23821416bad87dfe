"""`calc`: arithmetic and unit-conversion word problems solved with a `calculator` tool.

The ideal episode: call `calculator(expression=...)`, read the result, answer "The answer is:\nN". The answer
is graded on the *last number* in the final content (commas as thousands separators allowed), normalised
with `format_number` (ints without `.0`, floats rounded to 4 decimals) and compared with the exact result.

The calculator itself (`calculate`) evaluates arithmetic only, over the AST (numbers, `+ - * / // % **`,
parentheses, unary +/-), with limits on the expression length, exponent size and result magnitude; anything
else gives `"error: ..."`. It runs in-process: it never executes code.
"""
from __future__ import annotations

import ast
import math
import operator
import random
import re

from .base import Env, Task, tool_call_message

MAX_EXPRESSION_CHARS = 300
MAX_ABS_RESULT = 10 ** 30          # larger intermediate results are refused
MAX_EXPONENT = 100


def format_number(x) -> str:
    """Canonical text of a number: integers (and floats with an integral value) without `.0`, other floats
    rounded to 4 decimal places with trailing zeros dropped (`6.25`, `3.3333`, `0.5`); `-0` becomes `0`."""
    if isinstance(x, bool):
        x = int(x)
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    r = round(x, 4)
    if r == int(r) and abs(r) < 1e18:
        return str(int(r))
    return f"{r:.4f}".rstrip("0").rstrip(".")


class CalcError(ValueError):
    pass


def _check(v):
    if isinstance(v, complex):
        raise CalcError("complex result")
    if isinstance(v, float) and not math.isfinite(v):
        raise CalcError("result is not finite")
    if abs(v) > MAX_ABS_RESULT:
        raise CalcError("result too large")
    return v


def _pow(a, b):
    if abs(b) > MAX_EXPONENT:
        raise CalcError(f"exponent too large (max {MAX_EXPONENT})")
    if a != 0 and abs(b) * math.log10(abs(a)) > 30:
        raise CalcError("result too large")
    if a == 0 and b < 0:
        raise CalcError("division by zero")
    return a ** b


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise CalcError("division by zero")
        return _check(_BINOPS[type(node.op)](a, b))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    raise CalcError(f"unsupported syntax: {type(node).__name__}")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression safely; the formatted result, or `"error: ..."`."""
    if not isinstance(expression, str):
        expression = str(expression)
    expr = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    if not expr:
        return "error: empty expression"
    if len(expr) > MAX_EXPRESSION_CHARS:
        return f"error: expression longer than {MAX_EXPRESSION_CHARS} characters"
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return "error: invalid expression"
    try:
        return format_number(_eval(tree))
    except CalcError as e:
        return f"error: {e}"
    except (OverflowError, ZeroDivisionError, RecursionError, MemoryError) as e:
        return f"error: {type(e).__name__}"


CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object",
                       "properties": {"expression": {"type": "string", "description": "e.g. 37 * 12"}},
                       "required": ["expression"]},
    },
}

NAMES = ["Tom", "Ana", "Sam", "Lea", "Max", "Mia", "Ben", "Zoe", "Leo", "Ivy", "Ray", "Eva"]
ITEMS = ["apples", "pens", "books", "eggs", "cards", "coins", "stones", "shells", "cups", "balls"]
CONVERSIONS = [  # (from, to, op, factor)
    ("km", "meters", "*", 1000), ("meters", "centimeters", "*", 100), ("kg", "grams", "*", 1000),
    ("hours", "minutes", "*", 60), ("minutes", "seconds", "*", 60), ("liters", "milliliters", "*", 1000),
    ("meters", "km", "/", 1000), ("grams", "kg", "/", 1000), ("minutes", "hours", "/", 60),
    ("centimeters", "meters", "/", 100), ("days", "hours", "*", 24), ("weeks", "days", "*", 7),
]
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_THINK_CALL = ["I need to compute {e} with the calculator.", "Let me use the calculator for {e}.",
               "This is {e}. I will use the calculator.", "I should calculate {e}."]
# Numbers are copied as the same tokens they were read as: byte-level BPE splits "\n912" into 9|12 but
# " 912" into Ġ9|12 (and "85" into 85, " 85" into Ġ8|5), and a small model can copy tokens but not re-spell
# them. So the expression argument starts with a space, as its numbers do in the question and the reasoning
# ("<parameter=expression>\n 17 * 5"; the calculator ignores it), and after the call the result starts a
# line, as it does inside <tool_response>.
_THINK_ANSWER = ["The calculator returned:\n{r}", "The result is:\n{r}", "The calculator says:\n{r}"]
_ANSWER = ["The answer is:\n{r}", "{r}"]


def _dec(rng: random.Random, lo: int, hi: int) -> str:
    """A number with one decimal (sometimes integral), as text."""
    v = rng.randint(lo * 10, hi * 10) / 10
    return format_number(v)


def _problem(rng: random.Random, level: str) -> tuple[str, str]:
    """(question, expression)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if level == "easy":
        a, b = rng.randint(2, 20), rng.randint(2, 12)
        kind = rng.randrange(4)
        if kind == 0:
            return f"A box holds {a} {item}. How many {item} are in {b} boxes?", f"{a} * {b}"
        if kind == 1:
            return f"{name} has {a} {item} and gets {b} more. How many {item} now?", f"{a} + {b}"
        if kind == 2:
            a += b
            return f"{name} had {a} {item} and gave away {b}. How many are left?", f"{a} - {b}"
        op = rng.choice("+-*")
        return f"What is {a} {op} {b}?", f"{a} {op} {b}"
    if level == "medium":
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randint(11, 99), rng.randint(11, 99)
            return f"A crate holds {a} {item}. How many {item} are in {b} crates?", f"{a} * {b}"
        if kind == 1:
            b, each = rng.randint(2, 12), rng.randint(3, 40)
            return f"There are {b * each} {item}, shared equally by {b} kids. How many does each kid get?", \
                f"{b * each} / {b}"
        src, dst, op, f = rng.choice(CONVERSIONS)
        x = _dec(rng, 1, 20) if op == "*" else str(rng.randint(1, 50) * rng.choice([1, 5, 10, 30]))
        return f"Convert {x} {src} to {dst}.", f"{x} {op} {f}"
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randint(3, 60), rng.randint(2, 15), rng.randint(1, 20)
        return f"A ticket costs {a} dollars. What do {b} tickets cost with a {c} dollar fee?", f"{a} * {b} + {c}"
    if kind == 1:
        a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 20)
        return f"What is ({a} + {b}) * {c}?", f"({a} + {b}) * {c}"
    if kind == 2:
        a, b = rng.randint(10, 200), rng.randint(3, 9)
        return f"There are {a} dollars to split equally among {b} people. How much does each get?", f"{a} / {b}"
    s, t = rng.randint(20, 120), _dec(rng, 2, 6)
    return f"A car drives {s} km per hour for {t} hours. How far does it go in km?", f"{s} * {t}"


def last_number(text: str) -> str | None:
    """The last number in `text`, normalised with `format_number` (None when there is none)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "")
    return format_number(float(s) if "." in s else int(s))


class CalculatorEnv(Env):
    name = "calc"
    max_turns = 3
    tool_schemas = [CALCULATOR_TOOL]
    levels = (("easy", 0.4), ("medium", 0.35), ("hard", 0.25))

    def _draw(self, rng: random.Random) -> dict:
        level = rng.choices([lv for lv, _ in self.levels], [w for _, w in self.levels])[0]
        question, expr = _problem(rng, level)
        return {"text": question, "expression": expr, "difficulty": level}

    def _finish(self, split: str, index: int, p: dict) -> Task:
        answer = calculate(p["expression"])
        assert not answer.startswith("error"), (p, answer)
        return Task(env=self.name, split=split, index=index, messages=[{"role": "user", "content": p["text"]}],
                    tools=[dict(CALCULATOR_TOOL)], answer=answer,
                    meta={"difficulty": p["difficulty"], "expression": p["expression"]})

    def tool_result(self, task: Task, name: str, arguments: dict) -> str:
        if name != "calculator":
            return f"error: unknown tool {name!r} (available: calculator)"
        if not isinstance(arguments, dict) or "expression" not in arguments:
            return "error: missing required parameter 'expression'"
        return calculate(str(arguments["expression"]))

    def verify(self, task: Task, answer_text: str) -> bool:
        return last_number(answer_text or "") == task.answer

    def reference(self, task: Task, rng: random.Random, thinking: bool = True) -> list[dict]:
        expr, result = task.meta["expression"], task.answer
        call_id = f"call_{rng.getrandbits(48):012x}"
        return [
            {"role": "assistant", "content": "",
             "reasoning_content": rng.choice(_THINK_CALL).format(e=expr) if thinking else "",
             "tool_calls": [tool_call_message(call_id, "calculator", {"expression": " " + expr})]},
            {"role": "tool", "tool_call_id": call_id, "name": "calculator", "content": calculate(expr)},
            {"role": "assistant", "content": rng.choice(_ANSWER).format(r=result),
             "reasoning_content": rng.choice(_THINK_ANSWER).format(r=result) if thinking else ""},
        ]

"""Demo tools for `nemotron3 chat --tools`: a calculator and a sandboxed Python runner."""
from __future__ import annotations

from .calc import CALCULATOR_TOOL
from .sandbox import calculate, run_python

MAX_TOOL_OUTPUT = 2000

PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code in a sandbox (no files, no network) and return what it prints.",
        "parameters": {"type": "object",
                       "properties": {"code": {"type": "string", "description": "the program; print the result"}},
                       "required": ["code"]},
    },
}

DEMO_TOOLS = [CALCULATOR_TOOL, PYTHON_TOOL]


def execute_demo_tool(name: str, arguments: dict) -> str:
    """Run one demo tool call; the result text (errors as text, never an exception), at most 2000 chars."""
    args = arguments if isinstance(arguments, dict) else {}
    if name == "calculator":
        if "expression" not in args:
            return "error: missing required parameter 'expression'"
        out = calculate(str(args["expression"]))
    elif name == "python":
        if "code" not in args:
            return "error: missing required parameter 'code'"
        ok, out = run_python(str(args["code"]))
        if ok and not out.strip():
            out = "(no output)"
    else:
        return f"error: unknown tool {name!r} (available: calculator, python)"
    if len(out) > MAX_TOOL_OUTPUT:
        out = out[:MAX_TOOL_OUTPUT] + "\n...(truncated)"
    return out

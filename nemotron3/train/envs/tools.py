"""Demo tools for `nemotron3 chat --tools`: a calculator and Python run in `nemotron3.sandbox`.

The python tool fails closed like the sandbox: where it cannot run, the tool result says why (the model
sees an error, the chat goes on) unless the user opted in with --unsafe-no-sandbox."""
from __future__ import annotations

from ...sandbox import SandboxUnavailable, run_python
from .calc import CALCULATOR_TOOL, calculate

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
        try:
            r = run_python(str(args["code"]))
        except SandboxUnavailable as e:
            return f"error: {e}"
        out = r.text()
        if r.ok and not out.strip():
            out = "(no output)"
    else:
        return f"error: unknown tool {name!r} (available: calculator, python)"
    if len(out) > MAX_TOOL_OUTPUT:
        out = out[:MAX_TOOL_OUTPUT] + "\n...(truncated)"
    return out

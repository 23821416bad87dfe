"""Safe execution for the environments and the demo tools: an AST calculator and a sandboxed Python runner.

`calculate(expression)` evaluates arithmetic only (numbers, `+ - * / // % **`, parentheses, unary +/-), with
limits on the expression length, exponent size and result magnitude; anything else gives `"error: ..."`.
Results are formatted with :func:`format_number` (the same normalisation the calc verifier uses).

`run_python(code)` runs a snippet in a fresh `python -I -S` process: empty environment, a new temporary
working directory, resource limits (address space, CPU seconds, file size 0 so nothing can be written,
process count where the OS honours it), a prelude that makes `socket.socket`, forking/exec helpers and
`open(..., "w"/"a"/"x"/"+")` raise, bounded output capture, and a kill (whole process group) on timeout.
"""
from __future__ import annotations

import ast
import math
import operator
import os
import subprocess
import sys
import tempfile
import threading

MAX_EXPRESSION_CHARS = 300
MAX_ABS_RESULT = 10 ** 30          # larger intermediate results are refused
MAX_EXPONENT = 100
MAX_OUTPUT_BYTES = 64 * 1024


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


# ---- python sandbox -----------------------------------------------------------------------------------

_PRELUDE = r'''
import builtins, io, os, socket, sys
def _deny(what):
    def f(*a, **k):
        raise PermissionError(what + " is disabled in the sandbox")
    return f
for _n in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
    if hasattr(socket, _n):
        setattr(socket, _n, _deny("network access"))
try:
    import _socket
    _socket.socket = _deny("network access")
except ImportError:
    pass
for _n in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle",
           "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
           "kill", "killpg", "remove", "unlink", "rmdir", "rename", "replace"):
    if hasattr(os, _n):
        setattr(os, _n, _deny("os." + _n))
def _make_open(real):
    def open(file, mode="r", *a, **k):
        if any(c in str(mode) for c in "wax+"):
            raise PermissionError("writing files is disabled in the sandbox")
        return real(file, mode, *a, **k)
    return open
builtins.open = io.open = _make_open(io.open)
del _n, _deny, _make_open
_src = sys.stdin.read()
sys.stdin = io.StringIO("")
exec(compile(_src, "<snippet>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
'''


def _limits(memory_mb: int, cpu_s: int):
    def apply():
        import resource
        os.setsid()
        for lim, val in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu_s),
                         (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_CORE, 0),
                         (getattr(resource, "RLIMIT_NPROC", None), 0)):
            if lim is None:
                continue
            try:
                resource.setrlimit(lim, (val, val))
            except (ValueError, OSError):
                pass
    return apply


def _drain(stream, buf: bytearray):
    while True:
        chunk = stream.read(8192)
        if not chunk:
            break
        if len(buf) < MAX_OUTPUT_BYTES:
            buf += chunk[:MAX_OUTPUT_BYTES - len(buf)]


def run_python(code: str, timeout: float = 2.0, memory_mb: int = 256) -> tuple[bool, str]:
    """Run `code` in a sandboxed subprocess. Returns `(ok, text)`: `ok` is True when the snippet exited
    with status 0 within `timeout` seconds; `text` is its stdout when ok, otherwise stdout followed by the
    stderr (the traceback) or an `error: ...` line for a timeout / kill. Output is capped at 64 KiB."""
    with tempfile.TemporaryDirectory(prefix="nemotron3-sbx-") as cwd:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _PRELUDE], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env={},
                                preexec_fn=_limits(memory_mb, max(1, math.ceil(timeout)) + 1), close_fds=True)
        out, err = bytearray(), bytearray()
        readers = [threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True)]
        for t in readers:
            t.start()
        timed_out = False
        try:
            proc.stdin.write(code.encode("utf-8", "replace"))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()
        for t in readers:
            t.join(1.0)
        stdout = out.decode("utf-8", "replace")
        if timed_out:
            return False, stdout + f"error: timed out after {timeout:g}s"
        if proc.returncode == 0:
            return True, stdout
        stderr = err.decode("utf-8", "replace")
        if not stderr and proc.returncode < 0:
            stderr = f"error: killed by signal {-proc.returncode}"
        return False, stdout + stderr

"""Sandbox cost: start-up per call and the code environment's evaluation throughput, bubblewrap sandbox
(`nemotron3.sandbox`) vs the Python-hook runner it replaced (`nemotron3/train/envs/sandbox.py` read from git
history), and a bare `python -I -S -c pass` as the floor.

    python bench/sandbox.py [--calls 40] [--tasks 60] [--repeats 3] [--old-rev 2085b57]

Old and new alternate within each repeat (same machine load); the medians are reported.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nemotron3 import sandbox
from nemotron3.sandbox import SandboxResult
from nemotron3.train.envs import code as code_env

REPO = Path(__file__).resolve().parent.parent
SNIPPET = "x = 6\nprint(x * 7)"


def load_old(rev: str):
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:nemotron3/train/envs/sandbox.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_sandbox.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def per_call(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def env_throughput(run, n: int, start: int) -> float:
    """Code tasks built per second (each runs its snippet once) with `run` as the environment's runner."""
    code_env.run_python = run
    env = code_env.CodeEnv()
    t = time.perf_counter()
    tasks = env.tasks("train", n, start=start)
    dt = time.perf_counter() - t
    assert len(tasks) == n and all(t.answer for t in tasks)
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--tasks", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old-rev", default="2085b57", help="a commit that still has nemotron3/train/envs/sandbox.py")
    a = ap.parse_args()
    old = load_old(a.old_rev)
    problem = sandbox.sandbox_problem()
    if problem:
        sys.exit(f"sandbox unavailable: {problem}")
    new_run = code_env.run_python

    def old_as_new(code, **kw):                     # the old (ok, text) runner behind the new result type
        ok, out = old.run_python(code)
        return SandboxResult(stdout=out, stderr="", exit_code=0 if ok else 1)

    exe = sandbox._layout()[0]
    rows = {k: [] for k in ("bare", "old", "new", "env_old", "env_new")}
    for r in range(a.repeats):
        rows["bare"].append(per_call(lambda: subprocess.run([exe, "-I", "-S", "-c", "pass"]), a.calls))
        rows["old"].append(per_call(lambda: old.run_python(SNIPPET), a.calls))
        rows["new"].append(per_call(lambda: sandbox.run_python(SNIPPET), a.calls))
        start = 10_000 * (r + 1)                    # fresh tasks each repeat (the env caches per instance)
        rows["env_old"].append(env_throughput(old_as_new, a.tasks, start))
        rows["env_new"].append(env_throughput(new_run, a.tasks, start))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"python {sys.version.split()[0]}, {a.calls} calls x {a.repeats} repeats, {a.tasks} code tasks per repeat")
    print(f"per call: bare interpreter {med['bare'] * 1e3:.1f} ms, old runner {med['old'] * 1e3:.1f} ms, "
          f"sandbox {med['new'] * 1e3:.1f} ms ({med['new'] / med['old']:.2f}x old, "
          f"+{(med['new'] - med['bare']) * 1e3:.1f} ms over bare)")
    print(f"code env: old {med['env_old']:.1f} tasks/s, sandbox {med['env_new']:.1f} tasks/s "
          f"(throughput ratio new/old {med['env_new'] / med['env_old']:.2f})")
    print("all repeats (s/call, tasks/s):", {k: [round(x, 4) for x in v] for k, v in rows.items()})


if __name__ == "__main__":
    main()

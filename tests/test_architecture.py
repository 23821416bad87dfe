"""The package's shape: imports run downward through the layers, no module imports another in a circle, and
no module grows past MAX_LINES. Imports are read with `ast` (those inside functions too), so a lazy import
counts as much as a top-level one.

The tests also fail when a module is missing from LAYERS' prefixes (every module must have a place).
"""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent / "nemotron3"
MAX_LINES = 600

# (module prefix, layer): a module may import from its own layer or any lower one. The longest prefix wins.
LAYERS = {
    "nemotron3.config": 0, "nemotron3.presets": 0,
    "nemotron3.sandbox": 0,         # a leaf: runs code in bubblewrap, imports nothing of ours
    "nemotron3.safetensors_io": 0,  # a leaf: mapped safetensors reading, ordered writing (checkpoint.py's files)
    "nemotron3.model": 1,
    "nemotron3.quant": 2,
    "nemotron3.checkpoint": 3,
    "nemotron3.tokenizer": 4, "nemotron3.chat": 4,
    "nemotron3.engine": 5, "nemotron3.generate": 5,
    "nemotron3.server": 6, "nemotron3.eval": 6,
    "nemotron3.train": 7,           # train uses eval (held-out loss, RULER data, env grading); eval never imports train
    "nemotron3.cli": 8, "nemotron3.terminal_chat": 8, "nemotron3.__main__": 8, "nemotron3.train.__main__": 8,
    "nemotron3": 9,                 # the package's __init__: re-exports for users, above everything
}
# (importer, imported): imports allowed to run upward, at most one, each with the reason.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> int | None:
    """The layer of the longest LAYERS prefix of `module` ("nemotron3" itself names only the package's __init__)."""
    keys = [k for k in LAYERS if module == k or (k != "nemotron3" and module.startswith(k + "."))]
    return LAYERS[max(keys, key=len)] if keys else None


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """The nemotron3 modules `module` imports (a `from pkg import name` names the submodule when there is one)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:          # `import a.b.c` of a name inside a module
                t = t.rpartition(".")[0]
            if t.startswith("nemotron3") and t != module:
                out.add(t)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_layers_cover_every_module():
    missing = [m for m in MODULES if _layer(m) is None]
    assert not missing, f"modules with no layer in LAYERS: {missing}"
    assert len(ALLOWED_UPWARD) <= 1


def test_imports_run_downward():
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, targets in GRAPH.items() for t in sorted(targets)
           if _layer(t) > _layer(m) and (m, t) not in ALLOWED_UPWARD]
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "modules importing each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_modules_are_short():
    long = {m: n for m, p in MODULES.items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_lazy_and_relative_imports():
    """The graph holds an import made inside a function (cli's) and resolves relative ones."""
    assert "nemotron3.terminal_chat" in GRAPH["nemotron3.cli"]
    assert "nemotron3.engine.decode_plan" in GRAPH["nemotron3.engine.engine"]
    assert "nemotron3.quant.linear" in GRAPH["nemotron3.engine.decode_plan"]

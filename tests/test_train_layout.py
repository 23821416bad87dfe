"""The layout of train/ and eval/: eval sits below train (train imports eval, never the reverse), no import
cycle among their modules (lazy imports inside functions included), and no module over 600 lines."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "nemotron3"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every nemotron3 module `path` imports, at module level or inside a function."""
    mod, out = _module(path), set()
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nemotron3")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("nemotron3"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}     # `from . import x` names a module
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for d in ("train", "eval") for p in (PKG / d).rglob("*.py")]
    mods = {_module(p): p for p in files}
    return {m: {t for t in _imports(p) if t in mods and t != m} for m, p in mods.items()}


def test_eval_never_imports_train():
    bad = {m: sorted(t for t in ts if t.startswith("nemotron3.train")) for m, ts in _graph().items()
           if m.startswith("nemotron3.eval")}
    assert not any(bad.values()), bad


def test_no_import_cycle_in_train_and_eval():
    graph, state, cycles = _graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_modules_stay_under_600_lines():
    long = {str(p.relative_to(PKG)): n for d in ("train", "eval") for p in (PKG / d).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long

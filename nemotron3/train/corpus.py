"""Offline, deterministic pretraining corpus built from files already on the machine.

Why the Python standard library: the pipeline must run without network access, and
every machine that can run this package has a CPython install, so the corpus needs no
download and is reproducible for a given Python version. It is real, varied text
(~12 MB for 3.11: idiomatic code, comments, English docstrings, and the full language
reference inside ``pydoc_data/topics.py``) and it is under the permissive PSF License.
Test suites are left out (huge, repetitive, full of junk literals). Optionally
(``sources=["stdlib", "docs"]``) plain-text package docs from ``/usr/share/doc`` can be
added; they are opt-in because they differ between machines and carry per-package
licences (see each package's ``copyright`` file).

Documents are files. Pipeline: collect -> decode strict UTF-8 (skip others and files
> 1 MB) -> normalise newlines -> drop empty/exact-duplicate texts (SHA-256 of the
stripped text, first path in sorted order wins) -> sort by relative path -> split by a
hash of the path (stable under adding/removing other files) -> ``train.jsonl`` /
``val.jsonl`` / ``manifest.json``. No timestamps anywhere, so rebuilds are byte-identical.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

MAX_FILE_BYTES = 1 << 20
DOC_ROOT = Path("/usr/share/doc")
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
DOC_PATTERNS = ("README*", "*.txt", "*.md", "*.rst")
DOC_EXCLUDED = ("copyright", "changelog*", "NEWS*", "*.gz", "*.html")
LICENCES = {
    "stdlib": "Python standard library source: PSF License Version 2 (permissive).",
    "docs": "/usr/share/doc texts: licences vary per package, see /usr/share/doc/<pkg>/copyright.",
    "files": "Explicitly listed files: licence as per their origin.",
}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _walk(root: Path, keep) -> list[Path]:
    """Sorted files under ``root`` (symlinked dirs not followed) accepted by ``keep``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        out += [Path(dirpath, f) for f in filenames if keep(f)]
    return sorted(out)


def _is_doc(name: str) -> bool:
    match = lambda pats: any(fnmatch.fnmatch(name.lower(), p.lower()) for p in pats)  # noqa: E731
    return match(DOC_PATTERNS) and not match(DOC_EXCLUDED)


def _label(path: Path) -> str:
    """Stable document id: ``stdlib/<rel>``, ``doc/<rel>`` or ``files/<abs path>``."""
    path = path.resolve()
    for prefix, root in (("stdlib", stdlib_root()), ("doc", DOC_ROOT)):
        if path.is_relative_to(root):
            return f"{prefix}/{path.relative_to(root).as_posix()}"
    return "files" + path.as_posix()


def _collect(sources: Sequence[str | os.PathLike]) -> tuple[list[tuple[str, Path]], list[str]]:
    files, kinds = [], []
    for src in sources:
        if src == "stdlib":
            kinds.append("stdlib")
            files += _walk(stdlib_root(), lambda f: f.endswith(".py") and not f.startswith("test_"))
        elif src == "docs":
            kinds.append("docs")
            files += [p for p in _walk(DOC_ROOT, _is_doc) if not p.is_symlink()]
        else:
            p = Path(src)
            kinds.append("stdlib" if _label(p).startswith("stdlib/") else "files")
            files += _walk(p, lambda f: f.endswith(".py") or _is_doc(f)) if p.is_dir() else [p]
    labelled = sorted({_label(p): p for p in files}.items())
    return labelled, sorted(set(kinds))


def _read(path: Path) -> str | None:
    """Strict UTF-8 text with normalised newlines; ``None`` if unusable."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\x00" in text:
        return None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _split_value(label: str) -> float:
    """Uniform [0, 1) from the document id, independent of the rest of the corpus."""
    return int.from_bytes(hashlib.sha256(b"split:" + label.encode()).digest()[:8], "big") / 2.0**64


def build_corpus(out_dir: str | os.PathLike, sources: Sequence[str | os.PathLike] | None = None,
                 val_fraction: float = 0.01) -> dict:
    """Build ``train.jsonl``/``val.jsonl``/``manifest.json`` in ``out_dir``; return the manifest.

    ``sources``: ``"stdlib"`` (default), ``"docs"`` and/or explicit file/directory paths.
    At least one validation document is kept when ``val_fraction > 0`` and there are >= 2
    documents (the one with the smallest split hash), so tiny corpora still validate.
    """
    sources = ["stdlib"] if sources is None else list(sources)
    labelled, kinds = _collect(sources)
    docs, seen, skipped = [], set(), {"unreadable_or_large": 0, "empty": 0, "duplicate": 0}
    for label, path in labelled:
        text = _read(path)
        if text is None:
            skipped["unreadable_or_large"] += 1
            continue
        if not text.strip():
            skipped["empty"] += 1
            continue
        key = hashlib.sha256(text.strip().encode()).digest()
        if key in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(key)
        docs.append((label, text))

    is_val = [_split_value(label) < val_fraction for label, _ in docs]
    if val_fraction > 0 and len(docs) >= 2 and not any(is_val):
        is_val[min(range(len(docs)), key=lambda i: _split_value(docs[i][0]))] = True
    if len(docs) >= 2 and all(is_val):
        is_val[max(range(len(docs)), key=lambda i: _split_value(docs[i][0]))] = False

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": 1,
        "sources": [str(s) for s in sources],
        "python_version": platform.python_version(),
        "stdlib_root": str(stdlib_root()),
        "val_fraction": val_fraction,
        "documents": {}, "bytes": {}, "sha256": {},
        "skipped": skipped,
        "licence": " ".join(LICENCES[k] for k in kinds),
    }
    for split, want in (("train", False), ("val", True)):
        chosen = [(label, text) for (label, text), v in zip(docs, is_val) if v == want]
        payload = "".join(json.dumps({"path": label, "text": text}, ensure_ascii=False) + "\n"
                          for label, text in chosen).encode()
        tmp = out / f"{split}.jsonl.tmp"
        tmp.write_bytes(payload)
        os.replace(tmp, out / f"{split}.jsonl")
        manifest["documents"][split] = len(chosen)
        manifest["bytes"][split] = sum(len(t.encode()) for _, t in chosen)
        manifest["sha256"][f"{split}.jsonl"] = hashlib.sha256(payload).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def iter_documents(path: str | os.PathLike, split: str = "train") -> Iterator[dict]:
    """Yield ``{"path", "text"}`` dicts from a ``.jsonl`` file or a corpus directory."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)

"""Safetensors files as lazy, file-backed tensors, and an ordered (streaming) safetensors writer.

Reading: `MappedFile` maps a file once, private and read-on-demand (`torch.UntypedStorage.from_file(shared=False)`:
MAP_PRIVATE, copy-on-write), and a tensor is a view of that mapping at its offset. Nothing is read until a page is
used; untouched pages cost no memory, touched ones are page-cache pages the kernel can drop again. A write to such a
tensor copies only the written page (the file never changes). `drop_pages` unmaps the pages of a view that was read
once (e.g. the NaN scan at load), so resident memory is what decoding actually touches. The header is parsed here
because `safe_open` does not expose offsets; callers validate the file with `safe_open` first (its error messages).

Writing: `save_file` writes the standard layout (u64 header length, JSON header space-padded to 8 bytes, data) one
tensor at a time. Tensors go largest element size first (so each is aligned to its element size, as safetensors'
own writer does) and, within one element size, in the order `order_key` gives: per-expert tensors of one projection
can lie back to back in expert order and be read back as a single [E, ...] view (`MappedFile.stacked`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, tuple[str, tuple, int, int]]]:
    """(data start, {name: (dtype, shape, begin, end)}) with absolute byte offsets; ValueError if malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"header length {n} exceeds the file size {size}")
        header = json.loads(f.read(n))
    start, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        if not 0 <= b <= e <= size - start:
            raise ValueError(f"tensor {name!r}: data offsets {b}..{e} outside the data ({size - start} bytes)")
        out[name] = (info["dtype"], tuple(info["shape"]), start + b, start + e)
    return start, out


class MappedFile:
    """One safetensors file mapped private; `view` / `stacked` give tensors over the mapping (no copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.start, self.entries = read_header(self.path)
        size = self.path.stat().st_size
        # [size] uint8 over the whole file (an empty file cannot be mapped; it holds no tensor data anyway)
        self.storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=size) if size else None

    def _at(self, offset: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor | None:
        item = torch.empty((), dtype=dtype).element_size()
        if self.storage is None or offset % item:
            return None                           # misaligned for its dtype: the caller reads a copy instead
        t = torch.empty(0, dtype=dtype)
        return t.set_(self.storage, offset // item, shape, torch.empty(shape, device="meta").stride())

    def view(self, name: str) -> torch.Tensor | None:
        """The tensor `name` as a view of the mapping; None when its dtype is unknown or its offset misaligned."""
        dt, shape, b, _ = self.entries[name]
        return self._at(b, DTYPES[dt], shape) if dt in DTYPES else None

    def stacked(self, names: list[str]) -> torch.Tensor | None:
        """[len(names), *shape] view when the tensors have one dtype and shape and lie back to back in this order
        (as `save_file` writes per-expert tensors); else None."""
        first = self.entries[names[0]]
        dt, shape, b0, e0 = first
        step = e0 - b0
        for i, n in enumerate(names):
            d, s, b, e = self.entries[n]
            if d != dt or s != shape or b != b0 + i * step or e - b != step:
                return None
        return self._at(b0, DTYPES[dt], (len(names), *shape)) if dt in DTYPES else None

    def holds(self, t: torch.Tensor) -> bool:
        return self.storage is not None and t.untyped_storage().data_ptr() == self.storage.data_ptr()


_libc = None


def drop_pages(t: torch.Tensor) -> None:
    """Unmap the whole pages inside a mapped view that was only read (MADV_DONTNEED): its resident memory goes back
    to zero; a later read faults the pages in again from the page cache or the file. Never call it on a view that
    was written (a private mapping's written pages would revert to the file's contents)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    lo = (lo + _PAGE - 1) // _PAGE * _PAGE            # inward: pages shared with a neighbour stay
    hi = hi // _PAGE * _PAGE
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None,
              order_key=None) -> None:
    """Write `tensors` as a safetensors file, largest element size first, then by `order_key(name)` (default:
    the name). Data is written one tensor at a time (no second copy of the whole state)."""
    items = []
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be written to safetensors")
        items.append((name, t))
    items.sort(key=lambda kv: (-kv[1].element_size(), order_key(kv[0]) if order_key else kv[0]))
    header, pos = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)               # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

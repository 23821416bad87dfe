"""The C decode kernel (decode_step.c + decode_mat.c, decode_layers.c, decode_pool.c): its build, its ctypes
structures, and `Mat`s describing a module's weights where and as they are stored (used by decode_plan.py and the
engine's lm_head)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from ..quant.linear import FP8Linear, NVFP4Linear
from ..quant.quantize import NVFP4Experts


_SOURCE = Path(__file__).with_name("decode_step.c")
_SOURCES = [_SOURCE] + [Path(__file__).with_name(f"decode_{n}.c") for n in ("mat", "pool", "layers")]
# Reassociation lets the compiler vectorise the dot products; -ffast-math is avoided (see the C file).
_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
          "-ffp-contract=fast", "-shared", "-fPIC", "-pthread"]


class _Mat(ctypes.Structure):
    """decode_mat.c's `Mat`: a weight [rows = out, cols = in] where and as the model stores it."""
    _fields_ = [("fmt", ctypes.c_int64), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("w", ctypes.c_void_p), ("bscale", ctypes.c_void_p), ("s2", ctypes.c_float)]


class _Layer(ctypes.Structure):
    """decode_step.c's `Layer`."""
    _fields_ = [("kind", ctypes.c_int64), ("n", ctypes.c_int64 * 12), ("f", ctypes.c_double * 6),
                ("v", ctypes.c_void_p * 10), ("m", ctypes.POINTER(_Mat))]


F32, BF16, FP8, NVFP4 = range(4)


def _cpu_id() -> bytes:
    """What -march=native depends on: a build is cached per CPU model and feature set."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keys = ("model name", "flags", "Features", "CPU part")
    return (platform.machine() + platform.processor() + "".join(
        next((l for l in lines if l.startswith(k)), "") for k in keys)).encode()


def _cache_dir() -> Path:
    base = os.environ.get("NEMOTRON3_CACHE")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nemotron3"
    return Path(base) / "native"


@lru_cache(maxsize=1)
def native_library():
    """decode_step.c (`n3_decode_rows`, `n3_matmul`, `n3_argmax`, `n3_kv_store` / `n3_kv_load`; it includes
    decode_mat.c, decode_pool.c and decode_layers.c) compiled on first use with the system C compiler ($CC, cc
    or gcc) into $NEMOTRON3_CACHE/native (default ~/.cache/nemotron3/native; one file per sources, flags and CPU,
    written atomically), or None: NEMOTRON3_NATIVE=0, no compiler, or a failed build (warned)."""
    if os.environ.get("NEMOTRON3_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    src = b"".join(p.read_bytes() for p in _SOURCES)
    for flags in (["-march=native", *_FLAGS], _FLAGS):
        tag = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_id()).hexdigest()[:16]
        so = _cache_dir() / f"decode_step-{tag}.so"
        try:
            if not so.exists():
                so.parent.mkdir(parents=True, exist_ok=True)
                tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
                r = subprocess.run([cc, *flags, str(_SOURCE), "-o", str(tmp), "-lm"], capture_output=True,
                                   text=True, timeout=120)
                if r.returncode:
                    tmp.unlink(missing_ok=True)
                    warnings.warn(f"building the native decode step failed ({cc} {' '.join(flags)}): "
                                  f"{r.stderr.strip()[-500:]}")
                    continue
                os.replace(tmp, so)
            lib = ctypes.CDLL(str(so))
        except (OSError, subprocess.SubprocessError) as e:
            warnings.warn(f"the native decode step is unavailable: {e}")
            return None
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        lib.n3_decode_rows.argtypes = [P, I64, I64, I64, P, P, P, P, P, P, P, ctypes.c_double, P, P, P, I64]
        lib.n3_decode_rows.restype = ctypes.c_int
        lib.n3_matmul.argtypes = [P, P, I64, P, I64]
        lib.n3_matmul.restype = ctypes.c_int
        lib.n3_argmax.argtypes = [P, I64, I64, P]
        lib.n3_argmax.restype = None
        for fn in (lib.n3_kv_store, lib.n3_kv_load):
            fn.argtypes = [P, P, I64, I64, ctypes.c_float]
            fn.restype = None
        return lib
    return None


def default_threads(threads: int | None = None) -> int:
    """The kernel's thread count: `threads`, else torch's intra-op thread count."""
    return max(1, int(threads) if threads else torch.get_num_threads())


def _mat(mod, e: int | None = None, proj: str | None = None) -> tuple[_Mat, list] | None:
    """The `Mat` of a linear (nn.Linear, FP8Linear, NVFP4Linear), a router, or routed expert e's `proj` of an
    Experts / NVFP4Experts module, pointing at the module's own tensors (returned too, to keep alive);
    None when the storage is not one the kernel reads (fp16 weights, non-contiguous tensors)."""
    if proj is not None:
        if isinstance(mod, NVFP4Experts):
            w, bs, s2 = getattr(mod, proj)[e], getattr(mod, f"{proj}_weight_scale")[e], \
                getattr(mod, f"{proj}_weight_scale_2")[e]
            return _nvfp4_mat(w, bs, s2)
        return _dense_mat(getattr(mod, proj)[e])
    if isinstance(mod, NVFP4Linear):
        return _nvfp4_mat(mod.weight, mod.weight_scale, mod.weight_scale_2)
    if isinstance(mod, FP8Linear):
        w = mod.weight
        if not w.is_contiguous():
            return None
        return _Mat(FP8, w.shape[0], w.shape[1], w.data_ptr(), None, float(mod.weight_scale)), [w]
    return _dense_mat(mod.weight)


def _dense_mat(w: torch.Tensor):
    if w.dtype not in (torch.float32, torch.bfloat16) or not w.is_contiguous() or w.device.type != "cpu":
        return None
    return _Mat(F32 if w.dtype == torch.float32 else BF16, w.shape[0], w.shape[1], w.data_ptr(), None, 1.0), [w]


def _nvfp4_mat(w: torch.Tensor, bs: torch.Tensor, s2: torch.Tensor):
    if not (w.is_contiguous() and bs.is_contiguous()) or bs.dtype != torch.float8_e4m3fn:
        return None
    return _Mat(NVFP4, w.shape[0], 2 * w.shape[1], w.data_ptr(), bs.data_ptr(), float(s2)), [w, bs]


def matmul(x: torch.Tensor, mod, threads: int | None = None) -> torch.Tensor | None:
    """x [B, in] fp32 @ mod's weight^T (a linear in any stored format the kernel reads) -> [B, out] fp32, on
    `threads` threads in the C kernel (the weight read once for all rows: the engine's lm_head for a few
    rows); None when the kernel or the weight's format is unavailable."""
    lib = native_library()
    m = _mat(mod) if lib is not None else None
    if m is None or not (x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == m[0].cols
                         and x.device.type == "cpu"):
        return None
    x = x.contiguous()
    y = torch.empty(x.shape[0], m[0].rows)
    if lib.n3_matmul(ctypes.byref(m[0]), x.data_ptr(), x.shape[0], y.data_ptr(), default_threads(threads)):
        raise MemoryError("the native matmul could not allocate its scratch memory")
    return y


def argmax(logits: torch.Tensor) -> list[int] | None:
    """Row-wise argmax of fp32 logits [B, V] as a list (torch.argmax's rule: the first maximum, a NaN counts as
    the largest), in one C loop: torch's argmax over a [16, 8192] CPU tensor costs ~0.2-1 ms, most of a decode
    step at pico size. None when the kernel is unavailable or logits are not a contiguous fp32 CPU matrix."""
    lib = native_library()
    if lib is None or logits.dtype != torch.float32 or logits.dim() != 2 or logits.device.type != "cpu" \
            or not logits.is_contiguous():
        return None
    out = (ctypes.c_int64 * logits.shape[0])()
    lib.n3_argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], out)
    return list(out)

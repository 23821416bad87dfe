"""Memory bandwidth vs the decode kernel's weight streaming at Nano width.

    python bench/bandwidth.py [--threads 1 2] [--repeats 5] [--rows 131072] [--cols 2688]

1. A streaming read in C (a sum over a 1 GiB buffer, OpenMP threads): the measured bandwidth.
2. The C kernel's matmul (`decode.matmul`, what the lm_head and every decode-step linear run) on one row
   against a [rows, cols] weight (default: Nano's lm_head, 131072 x 2688) in bf16, NVFP4 and fp32:
   bytes of weight read per second, and that as a fraction of (1).
Interleaved: each repeat runs the stream read, then each format; medians are printed.
"""
import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nemotron3.engine import native as decode  # noqa: E402
from nemotron3.quant.linear import BF16Linear, NVFP4Linear  # noqa: E402

STREAM = r"""
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
double stream_read(const uint64_t *a, int64_t n, int threads) {
    uint64_t s = 0;
    #pragma omp parallel for num_threads(threads) reduction(+:s) schedule(static)
    for (int64_t i = 0; i < n; i += 4) s += a[i] ^ a[i + 1] ^ a[i + 2] ^ a[i + 3];
    return (double)s;
}
"""


def stream_lib():
    d = Path(tempfile.mkdtemp())
    (d / "s.c").write_text(STREAM)
    subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", d / "s.c", "-o", d / "s.so"],
                   check=True)
    lib = ctypes.CDLL(str(d / "s.so"))
    lib.stream_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.stream_read.restype = ctypes.c_double
    return lib


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--cols", type=int, default=2688)
    a = ap.parse_args()
    lib = stream_lib()
    buf = torch.ones(1 << 27, dtype=torch.int64)                 # 1 GiB
    lin = nn.Linear(a.cols, a.rows, bias=False)
    with torch.no_grad():
        lin.weight.normal_()
    mods = {"bf16": BF16Linear.from_linear(lin), "nvfp4": NVFP4Linear.from_linear(lin), "fp32": lin}
    nbytes = {k: sum(t.numel() * t.element_size() for t in m.buffers() if t.dim() == 2) or m.weight.numel() * 4
              for k, m in mods.items()}
    x = torch.randn(1, a.cols)
    for th in a.threads:
        res = {k: [] for k in ["stream", *mods]}
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            lib.stream_read(buf.data_ptr(), buf.numel(), th)
            res["stream"].append(buf.numel() * 8 / (time.perf_counter() - t0) / 1e9)
            for k, m in mods.items():
                t0 = time.perf_counter()
                decode.matmul(x, m, th)
                res[k].append(nbytes[k] / (time.perf_counter() - t0) / 1e9)
        bw = statistics.median(res["stream"])
        print(f"threads {th}: stream read {bw:.1f} GB/s", flush=True)
        for k in mods:
            g = statistics.median(res[k])
            print(f"  matmul 1 x {a.cols} @ [{a.rows}, {a.cols}] {k:5s}: {nbytes[k] / 2**20:7.1f} MiB, {g:5.1f} GB/s "
                  f"= {g / bw:.0%} of the stream read, {nbytes[k] / g / 1e6:.1f} ms", flush=True)


if __name__ == "__main__":
    main()

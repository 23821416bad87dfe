"""Which GEMM path prefill should use on this CPU: torch fp32 (MKL) vs torch bf16 (oneDNN) vs bf16 weights
widened to fp32 per call, at a Nano-width shape (512 tokens x 2688 -> 4096).

    python bench/cpu_gemm.py [--threads 2] [--rows 512] [--repeats 3]
"""
import argparse
import time

import torch
import torch.nn.functional as F


def best_ms(fn, n):
    fn()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, {a.threads} threads")
    x, w = torch.randn(a.rows, 2688), torch.randn(4096, 2688)
    xb, wb = x.bfloat16(), w.bfloat16()
    for _ in range(2):          # interleaved
        f = best_ms(lambda: F.linear(x, w), a.repeats)
        b = best_ms(lambda: F.linear(xb, wb), a.repeats)
        c = best_ms(lambda: F.linear(x, wb.float()), a.repeats)
        print(f"fp32 {f:.1f} ms   bf16 (oneDNN) {b:.1f} ms ({b / f:.2f}x)   bf16 weight widened + fp32 {c:.1f} ms "
              f"({c / f:.2f}x)")


if __name__ == "__main__":
    main()

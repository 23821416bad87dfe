"""The one timing helper the bench scripts share: the median wall time of a call (optionally after a warm-up)."""
import statistics
import time


def median_seconds(fn, repeats: int, warmup: bool = False) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

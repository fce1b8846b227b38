"""Timing helpers shared by the benchmarks: warm-up, then the median of repeats."""
from __future__ import annotations

import statistics
import time


def timeit_median(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)

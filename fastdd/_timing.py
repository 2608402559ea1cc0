"""Wall-clock timing shared by the demo and the benchmarks."""
from __future__ import annotations

import time


def best_of(fn, repeat: int = 3) -> tuple[float, float]:
    """(min, median) seconds of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]

"""Wall-clock helpers shared by the benchmarks that time several things in one run."""

from __future__ import annotations

import statistics
import time


def times(fn, rounds: int, warmup: int = 1) -> list[float]:
    """Milliseconds of `rounds` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def iqr(xs: list[float]) -> float:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[2] - q[0]

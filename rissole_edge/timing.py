"""Timing a call on a noisy, shared machine: shared by `bench` and the exporter's int8 speed-up
figure, so that both report the same statistic."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of `call()` after a warm-up: robust to a noisy, shared machine."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

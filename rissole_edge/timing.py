"""Timing a call on a noisy, shared machine: shared by `bench` and the exporter's int8 speed-up
figure, so that both report the same statistic."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 3,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of `call()` after a warm-up: robust to a noisy, shared machine. Wall time by
    default; `clock=time.thread_time` counts the calling thread's CPU time instead (the work of
    a single-threaded onnxruntime session, whatever share of a core the machine leaves it)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = clock()
        call()
        times.append(clock() - t0)
    return statistics.median(times)

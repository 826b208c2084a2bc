"""How the denoiser's work is spread over the CPU's cores: the sessions and the threading plan.

One denoiser call of a shipped model is about 200 kernels of about 30 us. onnxruntime's
intra-op threads fork and join around every kernel, so 2 intra-op threads measured 0.36-0.81x
one thread on a busy machine and 0.45-0.54x with both cores free (`rissole-edge bench`,
benchmarks/results/threads.md). Blocks are independent, so the parallelism that
pays is across blocks: worker threads take whole chunks of blocks from one queue and carry
each through every sampling step, each on a single-threaded session of its own (`Sessions`):
onnxruntime's `run` is thread-safe and releases the GIL, but two threads calling one session
made each call about 10% dearer (benchmarks/results/threads.md). A worker's session costs
about 7 MB of RSS, so the memory planner counts it (budget.make_plan) and it is made only when
a group first takes that worker. Taking chunks from a queue, rather than a fixed half each,
keeps both cores busy when one of them is shared with another process.

A worker pays only when its share of a call is work enough to hide the handover, so the plan
is chosen from the work per call measured on this machine (`probe`): small calls run on one
thread. It pays only on a core of its own, too: Linux's autogroup scheduler gives a process one
core's worth while any other session keeps the other core busy, whatever its nice value, and
there 2 workers measured 0.86x one thread at 32 blocks per call (1.51x with the core free). So
the plan looks at the load before each group (`idle_cores`). And it checks afterwards that
the workers beat what one thread would have taken (`note_gain`): on this KVM guest, 2 workers
also measured 0.85-0.90x one thread at 32 blocks for seconds at a time with nothing else
running in the guest (their CPU time per image rose to 1.8x one thread's, against 1.3x when
they paid: something the guest cannot see, most likely the host's load). When they did not
beat it, the plan stays on one thread for a while. Chunks never change what a block computes
(onnxruntime's kernels give the same result for a row whatever the batch;
tests/test_runtime.py checks it), so every plan gives the same pixels.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from .budget import release_free_memory
from .bundle import Bundle, BundleError, Spec
from .onnx_guard import check_self_contained

# One thread's time (`probe`'s CallCost) of each worker's call must reach this for a worker to pay.
# Measured with the other core free (fashion denoiser, 50 steps, interleaved rounds,
# benchmarks/results/threads.md): 2 workers gave 0.83x one thread at 2 blocks per worker and call
# (a 0.20 ms call), 1.25x at 8 (0.38 ms), 1.51x at 16 (0.62 ms; never below 1.38x in a round) and
# 1.71x at 32 (1.10 ms): onnxruntime's fixed cost per call (0.14 ms, against 0.03 ms a block) and
# the Python between calls eat the gain of small calls. Those were workers on one shared session;
# on a session each they gave 1.13x at 2 blocks, 1.47x at 8 and 1.64x at 16 (threads.md). The
# threshold stays, so that a default -n 1 or -n 4 keeps one worker and never makes a second session.
MIN_CALL_MS = 0.5
# Workers whose run took longer than one thread's estimated time / MIN_GAIN did not pay. Estimated
# gains at 32 fashion blocks per call: 1.4-1.5 with both cores ours, 0.8-0.9 when another process
# or the host took one.
MIN_GAIN = 1.1
# After such a run the default plan stays on one thread for HOLD_S, twice as long after each
# further such run, up to MAX_HOLD_S (a retry costs one group at about 0.85x; a success saves a
# third of each group's time).
HOLD_S = 1.0
MAX_HOLD_S = 60.0
MIN_TIMED_S = 0.01           # runs shorter than this say too little to note
# onnxruntime's NHWC layout transformer wraps every int8 conv in Transposes (36 kernels per
# fashion denoiser call); its int8 conv transposes inside the kernel when left in NCHW. Without
# the transformer the same outputs came faster, in thread CPU time of interleaved calls: the
# fashion denoiser 0.95x at 4 rows, 0.98x at 32, 0.99x at 256; twemoji's 1.00x and 0.98x; the
# decoders 0.94-0.96x.
DISABLED_OPTIMIZERS = ["NhwcTransformer"]
PROBE_ROWS = (8, 32)         # rows of the calls timed at open (a cost per call and one per row)
PROBE_CALLS = 5              # their least time counts (one call's CPU time varied 0.55-0.89 ms at load 4.5)
IDLE_REUSE_S = 0.5           # seconds a reading of the idle cores is used again
_idle_reading: tuple[float, int] = (float("-inf"), 1)     # (time.monotonic() when read, idle cores)
_held: tuple[float, float] = (float("-inf"), HOLD_S)      # (time.monotonic() until one thread, next hold)
# Whether the clock of a thread's CPU time is fine-grained (Windows counts it in 15.6 ms ticks).
FINE_THREAD_CLOCK = time.get_clock_info("thread_time").resolution < 1e-4
Item = TypeVar("Item")


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # not Linux
        return os.cpu_count() or 1


def idle_cores() -> int:
    """Cores that no other work is running on right now: all of them, less the threads the
    kernel counts as runnable (/proc/loadavg) other than this one (median of three looks, 1 ms
    apart). A second worker on a core that another process keeps busy only adds a handover
    (2 forced threads: 0.90x at 256 blocks per call under a load of 6 on 2 cores). All cores
    where the kernel does not say. A reading is reused for IDLE_REUSE_S: the looks took 2-3 ms
    on a busy machine, and a group of 8 fashion images at 4 steps takes about 10 ms.
    One core while a hold from `note_gain` lasts."""
    global _idle_reading
    if time.monotonic() < _held[0]:
        return 1
    taken, idle = _idle_reading
    if time.monotonic() - taken < IDLE_REUSE_S:
        return idle
    looks = []
    try:
        for look in range(3):
            if look:
                time.sleep(0.001)
            with open("/proc/loadavg") as f:
                looks.append(int(f.read().split()[3].split("/")[0]))
    except (OSError, ValueError, IndexError):
        return cores()
    idle = max(1, cores() - (sorted(looks)[1] - 1))
    _idle_reading = (time.monotonic(), idle)
    return idle


def note_gain(gain: float) -> None:
    """What a run of several workers found: one thread's estimated time over the run's wall
    time. Below MIN_GAIN the workers did not have a core each after all: work that the look at
    /proc/loadavg missed (a job asleep when looked at, one that started during the group) or
    that the guest cannot see (the host's load on the cores under ours), so `idle_cores` says 1
    for a hold that doubles while such runs repeat. A run that paid ends the hold."""
    global _held
    hold = _held[1]
    _held = (time.monotonic() + hold, min(2 * hold, MAX_HOLD_S)) if gain < MIN_GAIN else (float("-inf"), HOLD_S)


def session(bundle: Bundle, member: str) -> ort.InferenceSession:
    """A single-threaded session of one of the bundle's ONNX members. The member's bytes live
    only until onnxruntime has parsed them."""
    name = member.removesuffix(".onnx")
    model = bundle.read(member)
    check_self_contained(model, name)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # onnxruntime's memory patterns keep one planned block per input shape for good: off, a
    # default generate -n 1000 peaked 1.2-1.5 MB lower and ran no slower (0.95x, interleaved;
    # benchmarks/results/memory.md). Its arena stays on: without it the peak rose by 4 MB.
    options.enable_mem_pattern = False
    try:
        made = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=DISABLED_OPTIMIZERS)
    except Exception as e:   # onnxruntime raises its own untyped errors on bad graphs
        raise BundleError(f"the bundle's {name} does not load in onnxruntime: {first_line(e)}") from None
    del model
    release_free_memory()       # the member's bytes and onnxruntime's parse of them
    return made


class Sessions:
    """Sessions of one model, one per worker thread: `first()` (read at each use, so that a
    caller may wrap it) and others that `grow` makes with `make()`. A chunk's calls `take` the
    least-used session, so that workers as many as the sessions each run on their own."""

    def __init__(self, first: Callable[[], ort.InferenceSession], make: Callable[[], ort.InferenceSession]):
        self._first, self._make = first, make
        self._others: list[ort.InferenceSession] = []
        self._users = [0]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return 1 + len(self._others)

    def grow(self, count: int) -> None:
        """At least `count` sessions (call it before the workers start)."""
        while len(self) < count:
            self._others.append(self._make())
            self._users.append(0)

    @contextmanager
    def take(self) -> Iterator[ort.InferenceSession]:
        """The session that the fewest chunks are using now, for one chunk's calls."""
        with self._lock:
            i = self._users.index(min(self._users))
            self._users[i] += 1
        try:
            yield self._first() if i == 0 else self._others[i - 1]
        finally:
            with self._lock:
                self._users[i] -= 1


def first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def dummy_feeds(spec: Spec, rows: int, inputs: set[str]) -> dict[str, np.ndarray]:
    """Manifest-shaped denoiser inputs of `rows` rows (timing and probing; the values do not
    change the work)."""
    c, s, w = spec.latent_channels, spec.block_side, spec.window_side
    feeds = {"x": np.zeros((rows, c, s, s), np.float32), "t": np.full(rows, 500.0, np.float32),
             "pos": np.zeros(rows, np.int64), "cond": np.zeros((rows, spec.k * c, s, s), np.float32),
             "window": np.zeros((rows, c, w, w), np.float32)}
    return {k: v for k, v in feeds.items() if k in inputs}


@dataclass(frozen=True)
class CallCost:
    """Milliseconds of one thread's denoiser call of `rows` rows: a cost per call (onnxruntime's
    fixed cost: 0.14 ms for fashion) and one per row (0.03 ms), so that the plan can tell what
    a chunk of half the rows costs a worker."""
    per_call_ms: float
    per_row_ms: float

    def ms(self, rows: int) -> float:
        return self.per_call_ms + self.per_row_ms * rows


def probe(denoiser: ort.InferenceSession, spec: Spec, inputs: set[str]) -> CallCost:
    """One thread's cost of denoiser calls on this machine: the least of PROBE_CALLS calls of
    each of PROBE_ROWS rows (0.38 and 1.1 ms for fashion), after one that warms the session
    up. Timed in CPU time of the
    calling thread (the single-threaded session runs every kernel there), not wall time: on a
    busy machine the scheduler gives a process a share of a core (measured: 12.6-12.9 ms of CPU
    for a 256-row fashion call that took 24-25 ms of wall time at load 4.3), which would make
    the work look twice as big and the plan take a second worker for calls too small to pay.
    Wall time where the thread clock is coarse (Windows counts it in 15.6 ms ticks)."""
    clock = time.thread_time if FINE_THREAD_CLOCK else time.perf_counter
    least = []
    for rows in PROBE_ROWS:
        feeds = dummy_feeds(spec, rows, inputs)
        times = []
        for _ in range(1 + PROBE_CALLS):
            t0 = clock()
            try:
                denoiser.run(["eps"], feeds)
            except Exception as e:   # a model that loads but cannot run on manifest-shaped inputs
                raise BundleError(f"the bundle's denoiser failed: {first_line(e)}") from None
            times.append(clock() - t0)
        least.append(min(times[1:]) * 1e3)
    (few, many), (few_ms, many_ms) = PROBE_ROWS, least
    per_row = max(0.0, (many_ms - few_ms) / (many - few))
    return CallCost(max(0.0, few_ms - per_row * few), per_row)


@dataclass(frozen=True)
class ThreadPlan:
    """How one group's blocks are run."""
    workers: int              # threads, each taking whole chunks from one queue
    per_call: int             # blocks of one chunk (one denoiser call per sampling step)


def choose(blocks: int, max_in_flight: int, call_ms: Callable[[int], float], threads: int | None,
           max_workers: int | None = None) -> ThreadPlan:
    """The plan for `blocks` blocks, at most `max_in_flight` at a time over all workers (the
    memory plan's bound), where one thread's call of b blocks takes call_ms(b), on at most
    `max_workers` workers (the memory plan's sessions). `threads` None:
    as many workers as cores, but only as many as each get a call of MIN_CALL_MS, and only on
    cores that are idle now; a number: exactly that many (as far as there are blocks and
    sessions), as asked."""
    most = cores() if max_workers is None else min(cores(), max_workers)
    if threads is None:
        useful = next((w for w in range(most, 1, -1) if call_ms(_chunk(blocks, max_in_flight, w)) >= MIN_CALL_MS), 1)
        threads = min(useful, idle_cores()) if useful > 1 else 1
    elif max_workers is not None:
        threads = min(threads, max_workers)
    workers = max(1, min(threads, blocks, max_in_flight))
    return ThreadPlan(workers, _chunk(blocks, max_in_flight, workers))


def _chunk(blocks: int, max_in_flight: int, workers: int) -> int:
    """Blocks of each worker's chunk: an equal share, within the memory plan's bound."""
    return max(1, min(max_in_flight // workers, -(-blocks // workers)))


def one_thread_s(blocks: int, max_in_flight: int, call_ms: Callable[[int], float], steps: int) -> float:
    """Seconds one thread would take for the denoiser calls of `blocks` blocks through `steps`
    steps (`choose`'s arguments): what `run` holds several workers' time against."""
    per_call = _chunk(blocks, max_in_flight, 1)
    full, rest = divmod(blocks, per_call)
    return steps * (full * call_ms(per_call) + (call_ms(rest) if rest else 0.0)) / 1e3


def run(job: Callable[[Item], None], chunks: Sequence[Item], workers: int,
        one_thread: float | None = None) -> None:
    """job(chunk) for every chunk, on `workers` threads that take chunks in order from one
    queue (the calling thread is one of them). The first error stops the others' taking and
    is raised here. Given `one_thread`, seconds one thread would take for all of it, several
    workers' gain over that is noted (`note_gain`)."""
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            job(chunk)
        return
    lock = threading.Lock()
    pending = iter(chunks)
    errors: list[BaseException] = []
    start = time.perf_counter()

    def work() -> None:
        while True:
            with lock:
                chunk = next(pending, None) if not errors else None
            if chunk is None:
                return
            try:
                job(chunk)
            except BaseException as e:   # re-raised in the caller's thread
                with lock:
                    errors.append(e)
                return

    helpers = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(chunks)) - 1)]
    for t in helpers:
        t.start()
    try:
        work()
        for t in helpers:
            t.join()
    except BaseException as e:       # Ctrl-C while waiting: the others finish their chunk, take no more
        with lock:
            errors.append(e)
        for t in helpers:
            t.join()
        raise
    if errors:
        raise errors[0]
    took = time.perf_counter() - start
    if one_thread is not None and took >= MIN_TIMED_S:
        note_gain(one_thread / took)

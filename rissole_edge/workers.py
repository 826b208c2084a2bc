"""How the denoiser's work is spread over the CPU's cores: the sessions and the threading plan.

One denoiser call of a shipped model is about 200 kernels of about 30 us. onnxruntime's
intra-op threads fork and join around every kernel, so 2 intra-op threads measured 0.36-0.81x
one thread on a busy machine and 0.45-0.54x with both cores free (`rissole-edge bench`,
benchmarks/results/threads.md). Blocks are independent, so the parallelism that
pays is across blocks: worker threads take whole chunks of blocks from one queue and carry
each through every sampling step, each on a single-threaded session of its own (`Sessions`):
onnxruntime's `run` is thread-safe and releases the GIL, but two threads calling one session
made each call about 10% dearer (benchmarks/results/threads.md). A worker's session costs
about 7 MB of RSS, so the memory planner counts it (budget.make_plan), and 34-38 ms to make, so
it is made only when a group takes that worker and, for the default plan, only once the savings
that its groups forwent add up to that time (`Sessions.worth_growing`): a one-shot run of a
few images stays on one thread. Taking chunks from a queue, rather than a fixed half each,
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

# Several workers are taken where their estimated time (`denoise_s`) beats one thread's by this
# factor, where their sessions exist. Measured with the other core free (fashion denoiser, 50
# steps, interleaved rounds, benchmarks/results/threads.md "A session per worker"): 2 workers on a
# session each gave 1.13x one thread at 2 blocks per worker and call (estimated 1.10-1.13 from
# probe's 0.15-0.19 ms a call and 0.03 a row), 1.47x at 8 blocks per worker (estimated 1.5) and
# 1.64x at 16 (1.7). One block per worker is estimated at 1.00: the handover eats what the
# shorter call saves. On one shared session the 2-block calls lost (0.83x), which is why a
# worker needed a 0.5 ms call before each had its own. Whether to make a further session for a
# worker is decided apart (`Sessions.worth_growing`).
MIN_WORKER_GAIN = 1.05
# What a worker's call costs beyond one thread's time of the same call: the handover and the GIL
# between calls. Fitted to the same runs: 2 workers at 4, 16 and 32 blocks per call took 0.03,
# 0.01 and 0.005 ms a step more than their chunk's call plus the Python one thread runs between
# calls (which the workers run too, one at a time).
HANDOVER_MS = 0.03
# Workers whose run took longer than one thread's estimated time / MIN_GAIN did not pay. Estimated
# gains at 32 fashion blocks per call: 1.4-1.5 with both cores ours, 0.8-0.9 when another process
# or the host took one.
MIN_GAIN = 1.1
# Only runs whose workers were estimated to gain at least this are judged so: the one-thread
# estimate leaves out the Python between calls (about a tenth of a 4-block step), so at 4 fashion
# blocks, where 2 workers measured 1.13x, a good run reads about 1.02 and would look like a failed
# one. Estimated 1.12 there, 1.5 at 16 blocks and 1.7 at 32.
JUDGED_GAIN = 1.3
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
    least-used session, so that workers as many as the sessions each run on their own.
    `build_s` is what making one more is expected to take: the caller's measure of the first,
    then the last one `grow` made."""

    def __init__(self, first: Callable[[], ort.InferenceSession], make: Callable[[], ort.InferenceSession],
                 build_s: float = 0.0):
        self._first, self._make = first, make
        self._others: list[ort.InferenceSession] = []
        self._users = [0]
        self._lock = threading.Lock()
        self.build_s = build_s
        self._forgone_s = 0.0

    def __len__(self) -> int:
        return 1 + len(self._others)

    def worth_growing(self, count: int, saving_s: float) -> bool:
        """Whether a group that `count` workers would run `saving_s` seconds faster than the
        sessions there are should make the missing ones. Making one costs about build_s (a
        second fashion session 34-38 ms, against about 6 ms for a whole one-image run at 20
        steps, of which 2 workers would save under 1 ms), so the savings forgone add up until
        they reach that cost and only then is it paid (rent until the rent paid equals the
        price: never more than twice the best choice made knowing the future). A one-shot
        `generate -n 1` or `-n 4` never makes it; a process that keeps generating does, soon
        after its groups' forgone savings pay for it, whatever their size."""
        if count <= len(self):
            return True
        self._forgone_s += max(0.0, saving_s)
        return self._forgone_s >= self.build_s

    def grow(self, count: int) -> None:
        """At least `count` sessions (call it before the workers start); each one's making time
        becomes the next `build_s`."""
        while len(self) < count:
            start = time.perf_counter()
            self._others.append(self._make())
            self._users.append(0)
            self.build_s, self._forgone_s = time.perf_counter() - start, 0.0

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
    sizes = tuple(spec.whole_items(rows) for rows in PROBE_ROWS)
    for rows in sizes:
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
    (few, many), (few_ms, many_ms) = sizes, least
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
    as many workers as cores, but only as many as are estimated to beat one thread by
    MIN_WORKER_GAIN, and only on cores that are idle now; a number: exactly that many (as far
    as there are blocks and sessions), as asked."""
    most = cores() if max_workers is None else min(cores(), max_workers)
    if threads is None:
        one = denoise_s(blocks, max_in_flight, call_ms, 1)
        useful = next((w for w in range(most, 1, -1)
                       if one >= MIN_WORKER_GAIN * denoise_s(blocks, max_in_flight, call_ms, 1, w)), 1)
        threads = min(useful, idle_cores()) if useful > 1 else 1
    elif max_workers is not None:
        threads = min(threads, max_workers)
    workers = max(1, min(threads, blocks, max_in_flight))
    per_call = _chunk(blocks, max_in_flight, workers)
    return ThreadPlan(min(workers, -(-blocks // per_call)), per_call)     # no worker (nor session) without a chunk


def _chunk(blocks: int, max_in_flight: int, workers: int) -> int:
    """Blocks of each worker's chunk: an equal share, within the memory plan's bound."""
    return max(1, min(max_in_flight // workers, -(-blocks // workers)))


def denoise_s(blocks: int, max_in_flight: int, call_ms: Callable[[int], float], steps: int,
              workers: int = 1) -> float:
    """Seconds that the denoiser calls of `blocks` blocks through `steps` steps are estimated to
    take on `workers` workers (`choose`'s arguments): the calls of the worker that takes the most
    chunks, each call HANDOVER_MS dearer where there are several workers. One thread's estimate
    is what `run` holds several workers' time against; the Python between calls is left out of
    both (the workers run it one at a time, as one thread does)."""
    per_call = _chunk(blocks, max_in_flight, workers)
    sizes = [per_call] * (blocks // per_call) + ([blocks % per_call] if blocks % per_call else [])
    extra = HANDOVER_MS if workers > 1 else 0.0
    return steps * sum(call_ms(b) + extra for b in sizes[::workers]) / 1e3


def run(job: Callable[[Item], None], chunks: Sequence[Item], workers: int,
        estimate: tuple[float, float] | None = None) -> None:
    """job(chunk) for every chunk, on `workers` threads that take chunks in order from one
    queue (the calling thread is one of them). The first error stops the others' taking and
    is raised here. Given `estimate`, the seconds one thread and these workers are estimated
    to take (`denoise_s`), several workers' gain over one thread is noted (`note_gain`) where
    they were estimated to gain at least JUDGED_GAIN."""
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
    if estimate is not None and took >= MIN_TIMED_S and estimate[0] >= JUDGED_GAIN * estimate[1]:
        note_gain(estimate[0] / took)

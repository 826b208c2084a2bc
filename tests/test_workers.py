"""The threading plan (rissole_edge/workers.py): how many workers a group gets, the look at the
machine's load, and the check that each worker had a core. Timings are injected: no test here
depends on how fast the machine is."""

import io
import threading
import time

import pytest

from rissole_edge import workers


@pytest.fixture(autouse=True)
def fresh_readings(monkeypatch):
    """No reading of the load and no hold left over from other tests' runs."""
    monkeypatch.setattr(workers, "_idle_reading", (float("-inf"), 1))
    monkeypatch.setattr(workers, "_held", (float("-inf"), workers.HOLD_S))


def loadavg(monkeypatch, runnable: int, looks: list) -> None:
    text = f"1.0 1.0 1.0 {runnable}/300 9"
    monkeypatch.setattr(workers, "open", lambda path: looks.append(path) or io.StringIO(text), raising=False)


def test_thread_plans_follow_the_work_per_call(monkeypatch):
    monkeypatch.setattr(workers, "cores", lambda: 2)
    monkeypatch.setattr(workers, "idle_cores", lambda: 2)
    assert workers.choose(8, 128, 0.06, None) == workers.ThreadPlan(1, 8)     # 0.24 ms per worker: one thread
    assert workers.choose(4000, 128, 0.06, None) == workers.ThreadPlan(2, 64)  # both cores, half the memory plan each
    assert workers.choose(16, 128, 0.08, 3) == workers.ThreadPlan(3, 6)       # a number is obeyed
    assert workers.choose(2, 128, 0.08, 4).workers == 2      # but never more workers than blocks
    assert workers.choose(10, 1, 0.08, 2) == workers.ThreadPlan(1, 1)    # nor than the memory plan holds
    monkeypatch.setattr(workers, "idle_cores", lambda: 1)     # the other core is busy: one thread
    assert workers.choose(4000, 128, 0.06, None) == workers.ThreadPlan(1, 128)


def test_the_switch_sits_between_the_measured_sizes(monkeypatch):
    """A fashion block costs 0.047-0.060 ms by `probe` (idle and loaded): 32 blocks per call
    (2 workers measured 1.51x one thread with the other core free) take both cores, 16 blocks
    (1.25x) and 4 (0.83x) one."""
    monkeypatch.setattr(workers, "cores", lambda: 2)
    monkeypatch.setattr(workers, "idle_cores", lambda: 2)
    for block_ms in (0.047, 0.060):
        assert workers.choose(32, 512, block_ms, None) == workers.ThreadPlan(2, 16), block_ms
        assert workers.choose(16, 512, block_ms, None).workers == 1, block_ms
        assert workers.choose(4, 512, block_ms, None).workers == 1, block_ms


def test_idle_cores_reads_the_load_once_per_interval(monkeypatch):
    """A reading (three looks at /proc/loadavg) serves every plan made within IDLE_REUSE_S."""
    looks, now = [], [100.0]
    loadavg(monkeypatch, 2, looks)
    monkeypatch.setattr(workers.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(workers, "cores", lambda: 2)
    assert workers.idle_cores() == 1 and workers.idle_cores() == 1 and len(looks) == 3   # 2 runnable: one other
    now[0] += workers.IDLE_REUSE_S
    loadavg(monkeypatch, 1, looks)
    assert workers.idle_cores() == 2 and len(looks) == 6


def test_workers_that_shared_a_core_hold_the_plan_on_one_thread(monkeypatch):
    """The load looked idle, but a run's workers got half a core each: one core for HOLD_S,
    a doubled hold after each such run up to MAX_HOLD_S, and no hold once a run found a core
    per worker."""
    looks, now = [], [100.0]
    loadavg(monkeypatch, 1, looks)
    monkeypatch.setattr(workers.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(workers, "cores", lambda: 2)
    assert workers.idle_cores() == 2
    workers.note_core_share(0.96)                   # each worker had a core: nothing changes
    assert workers.idle_cores() == 2
    holds = []
    for _ in range(10):
        workers.note_core_share(0.5)
        start = now[0]
        while workers.idle_cores() == 1:
            now[0] += 0.25
        holds.append(now[0] - start)
    assert holds[:3] == [workers.HOLD_S, 2 * workers.HOLD_S, 4 * workers.HOLD_S]
    assert max(holds) == workers.MAX_HOLD_S
    workers.note_core_share(0.5)
    workers.note_core_share(0.9)                    # a forced run found a core per worker: the hold ends
    assert workers.idle_cores() == 2
    workers.note_core_share(0.5)
    assert workers.idle_cores() == 1
    now[0] += workers.HOLD_S                        # and the next hold is the first one again
    assert workers.idle_cores() == 2


def test_run_notes_the_share_of_a_core_its_workers_got(monkeypatch):
    """Workers that wait (here: sleep) get no CPU time: the run says they shared cores; a run
    too short to judge says nothing."""
    if not workers.FINE_THREAD_CLOCK:
        pytest.skip("this platform's thread clock is too coarse: run() notes nothing there")
    noted = []
    monkeypatch.setattr(workers, "note_core_share", noted.append)
    workers.run(lambda chunk: time.sleep(0.03), [0, 1], 2)
    assert len(noted) == 1 and noted[0] < workers.MIN_CORE_SHARE
    workers.run(lambda chunk: None, [0, 1], 2)
    workers.run(lambda chunk: time.sleep(0.03), [0, 1], 1)            # one thread: nothing to judge
    assert len(noted) == 1


def test_workers_run_every_chunk_once_and_raise_the_first_error():
    seen = []
    lock = threading.Lock()

    def job(chunk):
        with lock:
            seen.append(chunk)

    workers.run(job, list(range(50)), 3)
    assert sorted(seen) == list(range(50))

    def failing(chunk):
        if chunk == 7:
            raise ValueError("chunk 7")

    with pytest.raises(ValueError, match="chunk 7"):
        workers.run(failing, list(range(50)), 2)

"""The threading plan (rissole_edge/workers.py): how many workers a group gets, the look at the
machine's load, and the check that each worker had a core. Timings are injected: no test here
depends on how fast the machine is."""

import io
import threading
import time

import pytest

from rissole_edge import workers
from rissole_edge.bundle import Spec


@pytest.fixture(autouse=True)
def fresh_readings(monkeypatch):
    """No reading of the load and no hold left over from other tests' runs."""
    monkeypatch.setattr(workers, "_idle_reading", (float("-inf"), 1))
    monkeypatch.setattr(workers, "_held", (float("-inf"), workers.HOLD_S))


def loadavg(monkeypatch, runnable: int, looks: list) -> None:
    text = f"1.0 1.0 1.0 {runnable}/300 9"
    monkeypatch.setattr(workers, "open", lambda path: looks.append(path) or io.StringIO(text), raising=False)


FASHION = workers.CallCost(0.14, 0.03)     # probe's figures for the fashion denoiser (ms a call, ms a row)


def test_thread_plans_follow_the_work_per_call(monkeypatch):
    monkeypatch.setattr(workers, "cores", lambda: 2)
    monkeypatch.setattr(workers, "idle_cores", lambda: 2)
    assert workers.choose(2, 128, FASHION.ms, None) == workers.ThreadPlan(1, 2)     # a block each: no gain
    assert workers.choose(4000, 128, FASHION.ms, None) == workers.ThreadPlan(2, 64)  # half the memory plan each
    assert workers.choose(16, 128, FASHION.ms, 3) == workers.ThreadPlan(3, 6)       # a number is obeyed
    assert workers.choose(2, 128, FASHION.ms, 4).workers == 2      # but never more workers than blocks
    assert workers.choose(10, 1, FASHION.ms, 2) == workers.ThreadPlan(1, 1)    # nor than the memory plan holds
    monkeypatch.setattr(workers, "idle_cores", lambda: 1)     # the other core is busy: one thread
    assert workers.choose(4000, 128, FASHION.ms, None) == workers.ThreadPlan(1, 128)
    monkeypatch.setattr(workers, "cores", lambda: 4)
    monkeypatch.setattr(workers, "idle_cores", lambda: 4)     # as many workers as beat one thread by MIN_WORKER_GAIN
    assert workers.choose(6, 512, FASHION.ms, None) == workers.ThreadPlan(3, 2)     # 4 would leave one without a chunk


def test_the_switch_sits_between_the_measured_sizes(monkeypatch):
    """On a session each, 2 workers measured 1.13x one thread at 4 blocks per call (2 per
    worker), 1.47x at 16 and 1.64x at 32: all take both cores, also where the probe reads the
    calls dearer (a loaded machine: 0.17 ms a call, 0.036 a row), while 2 blocks (one per
    worker) would gain nothing and stay on one thread."""
    monkeypatch.setattr(workers, "cores", lambda: 2)
    monkeypatch.setattr(workers, "idle_cores", lambda: 2)
    for cost in (FASHION, workers.CallCost(0.17, 0.036), workers.CallCost(0.19, 0.028)):
        assert workers.choose(32, 512, cost.ms, None) == workers.ThreadPlan(2, 16), cost
        assert workers.choose(16, 512, cost.ms, None).workers == 2, cost
        assert workers.choose(4, 512, cost.ms, None) == workers.ThreadPlan(2, 2), cost
        assert workers.choose(2, 512, cost.ms, None).workers == 1, cost


def test_the_estimate_counts_each_workers_calls():
    """One thread runs chunks of at most the memory plan's blocks: 70 blocks at 32 in flight
    are calls of 32, 32 and 6 blocks each step. Two workers split them: the busier takes two
    chunks (32 and 6), each call HANDOVER_MS dearer; 32 blocks are one call of 16 each."""
    h = workers.HANDOVER_MS
    assert workers.denoise_s(70, 32, FASHION.ms, 50) == pytest.approx(50 * (2 * 1.1 + 0.32) / 1e3)
    assert workers.denoise_s(32, 512, FASHION.ms, 4) == pytest.approx(4 * 1.1 / 1e3)
    assert workers.denoise_s(70, 64, FASHION.ms, 50, 2) == pytest.approx(50 * (1.1 + h + 0.32 + h) / 1e3)
    assert workers.denoise_s(32, 512, FASHION.ms, 4, 2) == pytest.approx(4 * (0.62 + h) / 1e3)


@pytest.mark.parametrize("unit,few,many,per_call_ms", [(1, 8, 32, 0.14), (3, 9, 33, 0.11)])
def test_probe_fits_a_cost_per_call_and_per_row(monkeypatch, unit, few, many, per_call_ms):
    """The least of each size's timed calls (after a warm-up call) gives the line; a graph whose
    items are several rows (attention across blocks) is probed with whole items."""
    clock = [0.0]
    cost_s = {few: 0.38e-3, many: 1.1e-3}

    class Session:
        def run(self, outputs, feeds):
            clock[0] += cost_s[len(feeds["x"])] * (1.5 if not calls else 1.0)   # the first call is cold
            calls.append(len(feeds["x"]))

    calls = []
    monkeypatch.setattr(workers.time, "thread_time", lambda: clock[0])
    monkeypatch.setattr(workers.time, "perf_counter", lambda: clock[0])
    spec = type("Spec", (), {"latent_channels": 4, "block_side": 4, "window_side": 8, "k": 4,
                             "rows_per_item": unit, "whole_items": Spec.whole_items})()
    cost = workers.probe(Session(), spec, {"x", "t"})
    assert cost.per_row_ms == pytest.approx(0.03) and cost.per_call_ms == pytest.approx(per_call_ms)
    assert calls == [few] * (1 + workers.PROBE_CALLS) + [many] * (1 + workers.PROBE_CALLS)


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


def test_workers_that_did_not_pay_hold_the_plan_on_one_thread(monkeypatch):
    """The load looked idle, but a run's workers took longer than one thread's estimate /
    MIN_GAIN: one core for HOLD_S, a doubled hold after each such run up to MAX_HOLD_S, and
    no hold once a run paid."""
    looks, now = [], [100.0]
    loadavg(monkeypatch, 1, looks)
    monkeypatch.setattr(workers.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(workers, "cores", lambda: 2)
    assert workers.idle_cores() == 2
    workers.note_gain(1.45)                         # both cores ours: nothing changes
    assert workers.idle_cores() == 2
    holds = []
    for _ in range(10):
        workers.note_gain(0.85)
        start = now[0]
        while workers.idle_cores() == 1:
            now[0] += 0.25
        holds.append(now[0] - start)
    assert holds[:3] == [workers.HOLD_S, 2 * workers.HOLD_S, 4 * workers.HOLD_S]
    assert max(holds) == workers.MAX_HOLD_S
    workers.note_gain(0.85)
    workers.note_gain(1.5)                          # a forced run paid: the hold ends
    assert workers.idle_cores() == 2
    workers.note_gain(0.85)
    assert workers.idle_cores() == 1
    now[0] += workers.HOLD_S                        # and the next hold is the first one again
    assert workers.idle_cores() == 2


def test_run_notes_the_gain_over_one_thread(monkeypatch):
    """Two workers that each wait 30 ms took at least 30 ms: against a one-thread estimate of
    10 ms that is no gain, against 10 s a large one; without an estimate, on one thread, or
    where the workers were estimated to gain less than JUDGED_GAIN (the estimate's error is as
    big as such a gain), nothing is noted."""
    noted = []
    monkeypatch.setattr(workers, "note_gain", noted.append)
    workers.run(lambda chunk: time.sleep(0.03), [0, 1], 2, (0.01, 0.005))
    workers.run(lambda chunk: time.sleep(0.03), [0, 1], 2, (10.0, 5.0))
    assert len(noted) == 2 and noted[0] < workers.MIN_GAIN < noted[1]
    workers.run(lambda chunk: time.sleep(0.03), [0, 1], 2)
    workers.run(lambda chunk: time.sleep(0.03), [0, 1], 1, (0.01, 0.005))
    workers.run(lambda chunk: time.sleep(0.03), [0, 1], 2, (0.01, 0.01 / (workers.JUDGED_GAIN - 0.01)))
    assert len(noted) == 2
    workers.run(lambda chunk: time.sleep(0.03), [0, 1], 2, (0.01, 0.01 / (workers.JUDGED_GAIN + 0.01)))
    assert len(noted) == 3


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

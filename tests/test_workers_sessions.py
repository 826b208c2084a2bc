"""A denoiser session per worker: the memory planner counts each one, and a Generator makes a
worker's session only when a group first takes that worker. Sizes are injected: nothing here
depends on how fast or how loaded the machine is."""

import numpy as np
import pytest

from rissole_edge import budget, workers
from rissole_edge.bundle import Bundle, Spec
from rissole_edge.generator import Generator

MiB = 1 << 20
FIXED = 60 * MiB
SESSION = 2 * MiB           # a tiny row is 42 KB: the rows freed stay under MAX_ROWS


@pytest.fixture(scope="module")
def spec(tiny_bundle):
    return Spec.from_manifest(Bundle.open(tiny_bundle).manifest)


def held_bytes(plan: budget.Plan, spec: Spec) -> int:
    """What the plan may hold next to FIXED: its rows, its extra sessions, its decoder call."""
    rows = plan.blocks_per_call * plan.passes * spec.row_bytes
    return FIXED + rows + (plan.sessions - 1) * SESSION + budget.decode_bytes(spec, plan.images_per_decode)


def test_the_planner_counts_every_session(spec):
    least = budget.minimum(spec, FIXED)
    room_for_two = least + SESSION + 2 * budget.MIN_ROWS_PER_SESSION * spec.row_bytes + budget.decode_bytes(spec, 8)
    # Without a budget every worker may have its session; one worker never has a second.
    assert budget.make_plan(None, spec, FIXED, 1, 2, SESSION).sessions == 2
    assert budget.make_plan(None, spec, FIXED, 1, 1, SESSION).sessions == 1
    # The minimum budget keeps one worker: no room for a second session there.
    assert budget.make_plan(least, spec, FIXED, 1, 2, SESSION).sessions == 1
    two = budget.make_plan(room_for_two, spec, FIXED, 1, 2, SESSION)
    assert two.sessions == 2 and held_bytes(two, spec) <= room_for_two
    assert two.blocks_per_call >= 2 * budget.MIN_ROWS_PER_SESSION
    # The second session's bytes come out of the rows in flight, not on top of the budget.
    free_session = budget.make_plan(room_for_two, spec, FIXED, 1, 2, 0)
    assert free_session.blocks_per_call - two.blocks_per_call == SESSION // spec.row_bytes
    # A session much dearer than the rows left: one worker, all the rows.
    dear = budget.make_plan(room_for_two, spec, FIXED, 1, 2, 100 * MiB)
    assert dear.sessions == 1 and dear.blocks_per_call == budget.make_plan(room_for_two, spec, FIXED).blocks_per_call
    for budget_bytes in range(budget.minimum(spec, FIXED, 2), room_for_two + 40 * MiB, MiB // 4):
        plan = budget.make_plan(budget_bytes, spec, FIXED, 2, 3, SESSION)     # guided: two rows a block
        assert held_bytes(plan, spec) <= budget_bytes, budget_bytes


def test_workers_never_outnumber_the_planned_sessions(monkeypatch):
    monkeypatch.setattr(workers, "cores", lambda: 2)
    monkeypatch.setattr(workers, "idle_cores", lambda: 2)
    cost = workers.CallCost(0.14, 0.03)
    assert workers.choose(4000, 128, cost.ms, None, 2).workers == 2
    assert workers.choose(4000, 128, cost.ms, None, 1) == workers.ThreadPlan(1, 128)
    assert workers.choose(4000, 128, cost.ms, 2, 1).workers == 1         # a budget with one session keeps one worker


def test_a_second_session_is_made_only_when_two_workers_run(tiny_bundle):
    with Generator.open(tiny_bundle, threads=1) as one, Generator.open(tiny_bundle, threads=2) as two:
        expected = one.generate(3, seed=2, steps=4, as_array=True)
        assert len(two._denoisers) == 1                    # not at open
        got = two.generate(3, seed=2, steps=4, as_array=True)
        assert two.last_workers == 2 and len(two._denoisers) == 2 and len(one._denoisers) == 1
        assert np.array_equal(expected, got)


def test_sessions_are_taken_least_used_first():
    made = []
    pool = workers.Sessions(lambda: "first", lambda: made.append(1) or f"other{len(made)}")
    pool.grow(3)
    with pool.take() as a, pool.take() as b, pool.take() as c:
        assert {a, b, c} == {"first", "other1", "other2"}
        with pool.take() as d:                 # more chunks than sessions share them
            assert d in {a, b, c}
    with pool.take() as again:
        assert again == "first"
    pool.grow(2)
    assert len(made) == 2


def test_a_session_is_made_once_the_savings_forgone_pay_for_it(monkeypatch):
    """Making a session costs build_s (a fashion one about 36 ms). A group that a second worker
    would make 1 ms faster (a one-image run) does not pay it; once the savings forgone add up
    to build_s, it is made; a group saving more than build_s makes it at once. Sessions that
    exist are always worth taking, and each making's time is the next build_s."""
    clock = [0.0]
    monkeypatch.setattr(workers.time, "perf_counter", lambda: clock[0])

    def make() -> str:
        clock[0] += 0.05                      # this making takes 50 ms
        return "other"

    pool = workers.Sessions(lambda: "first", make, build_s=0.0355)
    assert pool.worth_growing(1, 0.0)
    assert not pool.worth_growing(2, -5.0)                 # a loss forgone saves nothing (and counts nothing)
    assert not any(pool.worth_growing(2, 0.001) for _ in range(35))      # 35 one-image runs: 35 ms forgone
    assert pool.worth_growing(2, 0.001)                                  # the 36th pays for it
    pool.grow(2)
    assert len(pool) == 2 and pool.build_s == pytest.approx(0.05)
    assert pool.worth_growing(2, 0.0)                      # it exists now
    assert not pool.worth_growing(3, 0.049)                # a third: the count started again at 0
    assert workers.Sessions(lambda: "first", make, build_s=0.0355).worth_growing(2, 0.04)


def test_the_default_plan_makes_a_second_session_only_when_it_pays(tiny_bundle, monkeypatch):
    """With the call costs and the cores injected: a default Generator keeps one worker (and
    one session) while the groups' savings forgone stay under the session's making time, takes
    2 workers once they reach it, and then keeps them for small groups too; the pixels stay
    the same."""
    monkeypatch.setattr(workers, "cores", lambda: 2)
    monkeypatch.setattr(workers, "idle_cores", lambda: 2)
    with Generator.open(tiny_bundle, threads=1) as one, Generator.open(tiny_bundle) as default:
        cost = workers.CallCost(0.14, 0.03)
        default._cost = cost
        blocks = default.spec.positions
        assert workers.choose(blocks, blocks, cost.ms, None).workers == 2    # 2 workers would pay per call
        steps = 4
        saving = workers.denoise_s(blocks, blocks, cost.ms, steps) - workers.denoise_s(blocks, blocks, cost.ms, steps, 2)
        default._denoisers.build_s = 2.5 * saving
        expected = one.generate(1, seed=3, steps=steps, as_array=True)
        for _ in range(2):
            assert np.array_equal(default.generate(1, seed=3, steps=steps, as_array=True), expected)
            assert default.last_workers == 1 and len(default._denoisers) == 1
        assert np.array_equal(default.generate(1, seed=3, steps=steps, as_array=True), expected)
        assert default.last_workers == 2 and len(default._denoisers) == 2
        default._denoisers.build_s = 1e9                    # making another would never pay, but it exists
        assert np.array_equal(default.generate(1, seed=3, steps=steps, as_array=True), expected)
        assert default.last_workers == 2

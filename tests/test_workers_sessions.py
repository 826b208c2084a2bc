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

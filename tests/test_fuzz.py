"""Bounded fuzzing of the bundle reader: every mutation of a valid bundle either still works
or ends in a RissoleError (one line and exit 2 at the CLI); never a crash or a hang."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing
from conftest import cli


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2 ** 32 - 1))
def test_mutated_bundles_fail_cleanly(tiny_bundle, tmp_path, seed):
    name, data = fuzzing.mutate(tiny_bundle.read_bytes(), seed)
    path = tmp_path / "fuzzed.rissole"
    path.write_bytes(data)
    outcome = fuzzing.check_case(path)           # any exception but RissoleError fails the test
    assert outcome in ("ok", "BundleError", "UsageError"), (name, outcome)


def test_cli_reports_mutations_in_one_line(tiny_bundle, tmp_path):
    for seed in range(6):
        name, data = fuzzing.mutate(tiny_bundle.read_bytes(), seed)
        path = tmp_path / f"{seed}.rissole"
        path.write_bytes(data)
        proc = cli("verify", str(path))
        if proc.returncode != 0:
            assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)

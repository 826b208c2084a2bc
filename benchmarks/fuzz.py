"""A long fuzz run of the bundle reader: `python benchmarks/fuzz.py BUNDLE [--cases 5000]`.

Uses the mutations of tests/fuzzing.py (the CI runs a bounded number of them); counts
outcomes per mutation kind and writes benchmarks/results/fuzz.json. Any exception other than
RissoleError, or a case slower than 10 s, is a finding and is listed.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import fuzzing  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--cases", type=int, default=5000)
    args = parser.parse_args()
    raw = args.bundle.read_bytes()
    counts: collections.Counter = collections.Counter()
    findings, slowest = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.rissole"
        for seed in range(args.cases):
            name, data = fuzzing.mutate(raw, seed)
            path.write_bytes(data)
            t0 = time.perf_counter()
            try:
                outcome = fuzzing.check_case(path)
            except Exception as e:  # a finding: anything but the documented error type
                outcome = f"FINDING {type(e).__name__}"
                findings.append({"seed": seed, "mutation": name, "error": f"{type(e).__name__}: {e}"[:300]})
            took = time.perf_counter() - t0
            slowest = max(slowest, took)
            if took > 10:
                findings.append({"seed": seed, "mutation": name, "error": f"took {took:.1f} s"})
            counts[f"{name}: {outcome}"] += 1
    result = {"bundle": args.bundle.name, "cases": args.cases, "slowest_case_s": round(slowest, 3),
              "outcomes": dict(sorted(counts.items())), "findings": findings}
    (Path(__file__).parent / "results" / "fuzz.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())

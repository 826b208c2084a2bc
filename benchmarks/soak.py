"""Soak test of one shared Generator: `python benchmarks/soak.py BUNDLE [--steps 10]`.

1. 8 threads x 50 images through one Generator give the same images as a serial run.
2. Peak RSS after 500 images is within 5% of that after 50 (no leak), in one fresh process.
3. 20 runs with different budgets, image counts and thread counts, each in its own process:
   peak RSS (as the OS reports it) never exceeds the budget.
Writes benchmarks/results/soak.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from rissole_edge.bench import minimum_budget
from rissole_edge.budget import rss
from rissole_edge.generator import Generator

LEAK_CHILD = """
import json, sys
from rissole_edge.budget import rss
from rissole_edge.generator import Generator
gen = Generator.open(sys.argv[1], threads=1)
peaks = {}
for i in range(50):
    gen.generate(10, seed=i, steps=int(sys.argv[2]), as_array=True)
    if (i + 1) * 10 in (50, 500):
        peaks[(i + 1) * 10] = rss()[1]
print(json.dumps(peaks))
"""


def threads_vs_serial(bundle: Path, steps: int) -> dict:
    with Generator.open(bundle, threads=1) as gen:
        serial = [gen.generate(50, seed=s, steps=steps, as_array=True) for s in range(8)]
        threaded: list = [None] * 8
        workers = [threading.Thread(target=lambda s=s: threaded.__setitem__(
            s, gen.generate(50, seed=s, steps=steps, as_array=True))) for s in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    same = all(np.array_equal(a, b) for a, b in zip(serial, threaded))
    return {"threads": 8, "images_per_thread": 50, "identical_to_serial": same}


def leak(bundle: Path, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", LEAK_CHILD, str(bundle), str(steps)], capture_output=True,
                         text=True, check=True).stdout
    peaks = {int(k): v / 2 ** 20 for k, v in json.loads(out).items()}
    return {"peak_rss_mb_after_50": round(peaks[50], 1), "peak_rss_mb_after_500": round(peaks[500], 1),
            "growth": round(peaks[500] / peaks[50] - 1, 4)}


def budgets(bundle: Path, steps: int, runs: int = 20) -> dict:
    rng = random.Random(0)
    low = minimum_budget(bundle) // 2 ** 20
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            budget = low + rng.choice([0, 1, 2, 5, 10, 20, 50, 100])
            n, threads = rng.choice([1, 4, 16, 64]), rng.choice([1, 2])
            proc = subprocess.run([sys.executable, "-m", "rissole_edge", "generate", "-m", str(bundle), "-n", str(n),
                                   "--steps", str(steps), "--threads", str(threads), "--memory-budget", f"{budget}MB",
                                   "-o", f"{tmp}/{i}", "--json"], capture_output=True, text=True)
            peak = json.loads(proc.stdout)["peak_rss_mb"] if proc.returncode == 0 else None
            results.append({"budget_mb": budget, "n": n, "threads": threads, "peak_rss_mb": peak,
                            "ok": peak is not None and peak <= budget, "error": proc.stderr.strip()[-200:] or None})
    return {"minimum_mb": low, "runs": results, "all_within_budget": all(r["ok"] for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    result = {"bundle": args.bundle.name, "steps": args.steps,
              "threads_vs_serial": threads_vs_serial(args.bundle, args.steps),
              "leak": leak(args.bundle, args.steps), "budgets": budgets(args.bundle, args.steps),
              "this_process_peak_rss_mb": round(rss()[1] / 2 ** 20, 1)}
    (Path(__file__).parent / "results" / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = (result["threads_vs_serial"]["identical_to_serial"] and result["leak"]["growth"] <= 0.05
          and result["budgets"]["all_within_budget"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

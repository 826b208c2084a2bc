"""Two workers on one shared denoiser session against a session each, in one process.

    python benchmarks/sessions.py [SIZE:ROUNDS ...]      (default 1:25 4:25 8:20 64:8)
    python benchmarks/sessions.py cold:ROUNDS


Times `generate` of SIZE fashion images (4 blocks each, 50 steps) with 1 thread, 2 workers on
one shared session (the plan before 2026-11-29), 2 workers on their own sessions (the plan
since) and the default plan, rounds in turning order so that the options see the same load;
prints JSON: medians of ms and CPU ms per image, and per-round ratios to 1 thread (median,
min, max). Results: benchmarks/results/threads.md, "A session per worker".

`cold:ROUNDS` times one-shot runs instead: a fresh Generator per run (1 thread, forced 2
threads, the default plan), its first generate(1) at the bundle's recommended sampler and steps,
rounds in turning order; prints medians in ms and the default's sessions per round (a forced 2
threads makes its second session in that run; the default makes it only once it pays).
Results: threads.md, "The second session only when it pays".
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from rissole_edge import workers
from rissole_edge.generator import Generator

STEPS = 50


def _ratios(base: list[float], other: list[float]) -> dict:
    ratios = sorted(a / b for a, b in zip(base, other))
    return {"median": round(statistics.median(ratios), 3), "min": round(ratios[0], 3), "max": round(ratios[-1], 3)}


def cold(rounds: int) -> None:
    options = {"1 thread": 1, "2 threads": 2, "default": None}
    ms: dict[str, list[float]] = {k: [] for k in options}
    sessions = []
    for r in range(rounds):
        names = list(options)
        for name in names[r % len(names):] + names[:r % len(names)]:
            with Generator.open(threads=options[name]) as gen:
                t0 = time.perf_counter()
                gen.generate(1, seed=r, as_array=True)
                ms[name].append((time.perf_counter() - t0) * 1e3)
                if options[name] is None:
                    sessions.append(len(gen._denoisers))
    print(json.dumps({"first_generate_1_ms_median": {k: round(statistics.median(v), 2) for k, v in ms.items()},
                      "default_sessions": sessions}, indent=1))


def main() -> None:
    if sys.argv[1:2] and sys.argv[1].startswith("cold:"):
        return cold(int(sys.argv[1].split(":")[1]))
    sizes = [tuple(map(int, a.split(":"))) for a in sys.argv[1:]] or [(1, 25), (4, 25), (8, 20), (64, 8)]
    gens = {"1 thread": Generator.open(threads=1), "2 shared": Generator.open(threads=2),
            "2 own": Generator.open(threads=2), "default": Generator.open()}
    shared = gens["2 shared"]
    shared._denoisers = workers.Sessions(lambda: shared.denoiser, lambda: shared.denoiser)   # every worker on one
    out: dict = {"load_average_1min_start": round(os.getloadavg()[0], 2), "steps": STEPS}
    for n, rounds in sizes:
        wall: dict[str, list[float]] = {k: [] for k in gens}
        cpu: dict[str, list[float]] = {k: [] for k in gens}
        chosen = []
        for gen in gens.values():
            gen.generate(n, seed=99, steps=STEPS, as_array=True)       # warm-up; makes the second sessions
        for r in range(rounds):
            names = list(gens)
            for name in names[r % len(names):] + names[:r % len(names)]:
                c0, t0 = time.process_time(), time.perf_counter()
                gens[name].generate(n, seed=r, steps=STEPS, as_array=True)
                wall[name].append((time.perf_counter() - t0) * 1e3 / n)
                cpu[name].append((time.process_time() - c0) * 1e3 / n)
            chosen.append(gens["default"].last_workers)
        row = {"ms_per_image_median": {k: round(statistics.median(v), 3) for k, v in wall.items()},
               "cpu_ms_per_image_median": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
               "default_workers": chosen,
               "own vs shared": _ratios(wall["2 shared"], wall["2 own"])}
        row.update({f"{k} vs 1 thread": _ratios(wall["1 thread"], wall[k]) for k in ("2 shared", "2 own", "default")})
        out[f"n={n} ({n * gens['default'].spec.positions} blocks)"] = row
    out["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

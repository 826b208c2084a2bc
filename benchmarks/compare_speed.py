"""ms per image of several bundles, each at its own sampler and step count, in one run.

A default that changes (a new model, sampler, step count or guidance) is judged by its time
against the default it replaces, measured in the same run: rows are timed in interleaved
rounds, each in a fresh process (bench's child: batches of 8 on 2 threads), so a shared
machine slows them alike; the ratio to the first row is taken per round.

    python benchmarks/compare_speed.py /tmp/old-teacher.rissole:dpmpp-2m:30 \
        models/twemoji-teacher.rissole:ddim:50 models/twemoji.rissole:ddim:4 --rounds 3

Prints JSON: each row's ms per round and median, its per-round ratio to the first row, and the
load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from rissole_edge.bench import run_child
from rissole_edge.sampler import SAMPLERS

TIMED_IMAGES = 8           # images per timed batch


def ms_per_image(bundle: Path, steps: int, sampler: str = "ddim") -> float:
    """Batches of TIMED_IMAGES on 2 threads in a fresh process (bench's child)."""
    cfg = {"bundle": str(bundle), "threads": 2, "steps": steps, "sampler": sampler, "images": TIMED_IMAGES}
    return 1e3 / run_child(cfg)["batched_images_per_s"]


def _row(text: str) -> tuple[Path, str, int]:
    """BUNDLE:SAMPLER:STEPS (the bundle path may itself hold colons)."""
    bundle, sampler, steps = text.rsplit(":", 2)
    if sampler not in SAMPLERS or not steps.isdigit() or int(steps) < 1 or not Path(bundle).is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: give BUNDLE:SAMPLER:STEPS with an existing bundle file, "
                                         f"a sampler of {', '.join(SAMPLERS)} and steps >= 1")
    return Path(bundle), sampler, int(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", type=_row, help="BUNDLE:SAMPLER:STEPS; the first is the reference")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    names = [f"{b}:{s}:{k}" for b, s, k in args.rows]
    times: dict[str, list[float]] = {name: [] for name in names}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, (bundle, sampler, steps) in zip(names, args.rows):
            times[name].append(ms_per_image(bundle, steps, sampler))
    load.append(os.getloadavg()[0])
    first = times[names[0]]
    json.dump({"images_per_batch": TIMED_IMAGES, "threads": 2, "rounds": args.rounds,
               "load_average_1min_before_after": load,
               "rows": {name: {"ms_per_image_rounds": [round(x, 2) for x in t],
                               "ms_per_image": round(statistics.median(t), 2),
                               "ratio_to_first_per_round": [round(a / b, 3) for a, b in zip(t, first)]}
                        for name, t in times.items()}}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

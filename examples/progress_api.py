"""Generate images with the Python API and show progress.

    python examples/progress_api.py BUNDLE OUT.png [--n 16] [--seed 0] [--steps 50]

The runtime API in five lines: open a Generator (optionally within a memory budget), call
generate() with a progress callback, and get PIL images back.
"""

from __future__ import annotations

import argparse
import sys

from rissole_edge.generator import Generator
from rissole_edge.images import grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)

    def on_progress(done: int, total: int) -> None:      # images finished so far, of all asked for
        print(f"\rimages {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    with Generator.open(args.bundle, memory_budget="256MB") as gen:
        images = gen.generate(args.n, seed=args.seed, steps=args.steps, on_progress=on_progress)
    grid(images).save(args.out)
    print(f"wrote {len(images)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

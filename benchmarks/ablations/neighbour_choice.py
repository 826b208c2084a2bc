"""Which neighbours a generation is conditioned on, at sampling time only (issue 17, item 2).

    python benchmarks/ablations/neighbour_choice.py MODE [--bundle B] [-n 500] [--guidance G] --json OUT

`rissole-edge evaluate`'s full measure of a bundle (DDIM at its steps, its guidance unless
--guidance, seed 0)
with the k neighbours of every query chosen by MODE instead of k of the nearest `window`
drawn at random, as training draws them:
- drawn: the shipped rule (the control; the same figures as `evaluate`);
- nearest: the k nearest, always;
- one: the nearest alone, repeated k times, so every block follows the same image;
- two: the two nearest, each repeated k / 2 times (k even).
The draw's random numbers are still consumed, so every mode gets the same noise. The runtime
is patched for this process only: nothing here is a generate option.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import rissole_edge.retrieval as retrieval
from rissole_export import evaluate

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DRAW = retrieval.draw_neighbours


def chooser(mode: str):
    def choose(candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        drawn = SHIPPED_DRAW(candidates, k, rng)          # consumes the rng as the shipped rule does
        if mode == "drawn":
            return drawn
        if mode == "nearest":
            return candidates[:k]
        distinct = 1 if mode == "one" else 2
        return candidates[np.repeat(np.arange(distinct), -(-k // distinct))[:k]]
    return choose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("drawn", "nearest", "one", "two"))
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "twemoji-teacher.rissole")
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--guidance", type=float, help="default: the bundle's recorded scale")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    retrieval.draw_neighbours = chooser(args.mode)
    result = evaluate.evaluate(args.bundle, args.n, guidance=args.guidance, log=lambda msg: None)
    result["neighbour_mode"] = args.mode
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

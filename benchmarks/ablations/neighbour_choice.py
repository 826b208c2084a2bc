"""Which neighbours a generation is conditioned on, at sampling time only (issue 17, item 2).

    python benchmarks/ablations/neighbour_choice.py MODE [--bundle B] [-n 500] [--guidance G] --json OUT

`rissole-edge evaluate`'s full measure of a bundle (DDIM at its steps, its guidance unless
--guidance, seed 0)
with the k neighbours of every query chosen by MODE instead of k of the nearest `window`
drawn at random, as training draws them:
- drawn: the shipped rule (the control; the same figures as `evaluate`);
- nearest: the k nearest, always;
- one: the nearest alone, repeated k times, so every block follows the same image;
- two: the two nearest, each repeated k / 2 times (k even);
- no-variants: k drawn at random, as the shipped rule, from the nearest `window` that are not
  variants of the query entry (the data's `train_families`: for Twemoji, the same emoji in
  another skin tone). Such a neighbour is nearly the query's own picture; a model that
  redraws it faithfully makes a copy of a training image. Queries by entry only.
The draw's random numbers are still consumed, so every mode gets the same noise. The runtime
is patched for this process only: nothing here is a generate option.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np

import rissole_edge.retrieval as retrieval
from rissole_edge.bundle import Bundle
from rissole_export import data as datasets, evaluate
from rissole_export.config import DataConfig

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


def without_variants(families: np.ndarray):
    """A `Database.entry_candidates` that asks the index as `Database.candidates` does, for
    a window wider by the largest family, then drops the entry's variants from it."""
    spare = int(np.bincount(families).max())           # room for the variants dropped

    def entry_candidates(db: retrieval.Database, entry: int, label: int | None = None) -> np.ndarray:
        wide = copy.copy(db)
        wide.spec = dataclasses.replace(db.spec, window=db.spec.window + spare)
        found = retrieval.Database.candidates(wide, db.key_of_entry(entry), db.codes[entry], label, exclude=entry)
        return found[families[found] != families[entry]][:db.spec.window]
    return entry_candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("drawn", "nearest", "one", "two", "no-variants"))
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "twemoji-teacher.rissole")
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--guidance", type=float, help="default: the bundle's recorded scale")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.mode == "no-variants":
        manifest = Bundle.open(args.bundle).manifest
        source, image = manifest.get("dataset", {}).get("name"), manifest["image"]
        geometry = DataConfig(source=source, size=image["size"], channels=image["channels"])
        families = datasets.load(source, geometry).train_families
        if families is None:
            raise SystemExit(f"{source} does not say which of its images are variants of one another")
        if len(families) != manifest["retrieval"]["images"]:
            raise SystemExit(f"{args.bundle}'s database is not {source}'s training split, image for image")
        retrieval.Database.entry_candidates = without_variants(families)
    else:
        retrieval.draw_neighbours = chooser(args.mode)
    result = evaluate.evaluate(args.bundle, args.n, guidance=args.guidance, log=lambda msg: None)
    result["neighbour_mode"] = args.mode
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Where the time of one generation goes, per image: the denoiser calls against everything
else (retrieval, noise, sampler arithmetic, decoder, PNG writing, Python around them).

    python benchmarks/fixed_costs.py [--row models/fashion-mnist-4step.rissole:4:ddim ...] [-n 8]
        [--rounds 9] [-o benchmarks/results/fixed-costs.json]

A few-step bundle is only as fast as its fixed costs allow: at 4 steps a block costs four
denoiser calls, and what is paid once per image (neighbours, x_T, the decoder, the PNG) is a
large share of the time. Each `BUNDLE:STEPS:SAMPLER` row runs `generate(n)` `--rounds` times in
this process on one thread, so that every part runs on the calling thread and is timed by that
thread's CPU clock (time.thread_time: time spent waiting for a core that other processes hold
is not counted, so the parts hold still on a busy machine); medians over rounds, in ms per
image. "generate cpu" is the whole call on the same clock, "generate wall" its wall time.
PNG writing (as the CLI does it, one file per image) is timed apart, on the same clock.
Parts:
- retrieval: `_conditions` (query/neighbour draws, the entries' neighbour lists or the HNSW
  index, gathering neighbour blocks);
- noise: x_T and stochastic samplers' step noise (rng.py);
- denoiser: the denoiser session's `run`; sampler+python: the rest of `_denoise` (the
  sampler's arithmetic, stacking inputs, the thread plan);
- decoder: the decoder session's `run`; decode other: joining blocks and converting to uint8;
- generate other: the rest of `generate` (groups, checks, the pixel array).
Against each data set's row with the most steps (the 50-step DDIM baseline), every row gets
its time ratio, the ratio of its denoiser calls (the steps), of its denoiser rows (calls times
2 under guidance) and of its denoiser time alone: the time ratio can only reach the row ratio
when everything else is free.
The machine is shared: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from rissole_edge import budget, images, rng
from rissole_edge.generator import Generator

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROWS = ["models/fashion-mnist-4step.rissole:4:ddim", "models/fashion-mnist.rissole:20:dpmpp-2m",
                "models/fashion-mnist.rissole:50:ddim", "models/twemoji.rissole:4:ddim",
                "models/twemoji-teacher.rissole:20:dpmpp-2m", "models/twemoji-teacher.rissole:50:ddim"]


CLOCK = time.thread_time


class _Timed:
    """A session (or anything with `run`) whose calls add their CLOCK time to `totals[name]`."""

    def __init__(self, inner, name: str, totals: dict[str, float]):
        self.inner, self.name, self.totals = inner, name, totals

    def run(self, *args, **kwargs):
        t0 = CLOCK()
        try:
            return self.inner.run(*args, **kwargs)
        finally:
            self.totals[self.name] += CLOCK() - t0


def _timed(fn: Callable, name: str, totals: Callable[[], dict[str, float]]) -> Callable:
    """fn, adding its CLOCK time to `totals()[name]` (rng's functions are module-wide: their
    time goes to the row now running)."""
    def wrapper(*args, **kwargs):
        t0 = CLOCK()
        try:
            return fn(*args, **kwargs)
        finally:
            totals()[name] += CLOCK() - t0
    return wrapper


class _Row:
    """One BUNDLE:STEPS:SAMPLER row: a generator on one thread with timers around its parts."""

    def __init__(self, bundle: Path, steps: int, sampler_name: str, n: int):
        self.gen = Generator.open(bundle, threads=1)
        self.n, self.kwargs = n, dict(steps=steps, sampler_name=sampler_name, as_array=True, force_steps=True)
        self.gen.generate(n, seed=0, **self.kwargs)             # warm-up: sessions' first calls
        self.totals: dict[str, float] = defaultdict(float)
        self.gen.denoiser = _Timed(self.gen.denoiser, "denoiser", self.totals)
        self.gen.decoder = _Timed(self.gen.decoder, "decoder", self.totals)
        for name, part in (("_conditions", "retrieval"), ("_denoise", "denoise_total"), ("_decode", "decode_total")):
            setattr(self.gen, name, _timed(getattr(self.gen, name), part, lambda: self.totals))
        self.per_round: dict[str, list[float]] = defaultdict(list)
        passes = budget.passes(self.gen.spec, self.gen.spec.guidance)     # 2: guidance's two rows per block
        self.record = {"bundle": str(bundle), "dataset": self.gen.bundle.manifest["dataset"]["name"],
                       "steps": steps, "sampler": sampler_name, "n": n, "rows_per_block": steps * passes}

    def run(self, seed: int, noise: list[dict[str, float]]) -> None:
        """One round: generate(n) and write its PNGs; `noise[0]` is where rng's timers add."""
        self.totals.clear()
        noise[0] = self.totals
        t0, c0 = time.perf_counter(), CLOCK()
        pixels = self.gen.generate(self.n, seed=seed, **self.kwargs)
        wall, cpu = time.perf_counter() - t0, CLOCK() - c0
        with tempfile.TemporaryDirectory() as folder:
            c1 = CLOCK()
            for i, p in enumerate(pixels):
                images.save_png(p, Path(folder) / f"{i}.png")
            png = CLOCK() - c1
        t = self.totals
        parts = {
            "retrieval": t["retrieval"], "noise": t["noise"], "denoiser": t["denoiser"],
            "sampler+python": t["denoise_total"] - t["denoiser"] - t["noise"],
            "decoder": t["decoder"], "decode other": t["decode_total"] - t["decoder"],
            "generate other": cpu - t["retrieval"] - t["denoise_total"] - t["decode_total"],
            "generate cpu": cpu, "generate wall": wall, "png write": png,
        }
        for name, seconds in parts.items():
            self.per_round[name].append(seconds * 1e3 / self.n)

    def result(self) -> dict:
        """Medians over rounds, ms per image."""
        ms = {name: round(statistics.median(v), 4) for name, v in self.per_round.items()}
        ms["not denoiser"] = round(ms["generate cpu"] - ms["denoiser"], 4)
        return {**self.record, "ms_per_image": ms}


def measure(specs: list[tuple[Path, int, str]], n: int, rounds: int) -> list[dict]:
    """Every row's parts, the rows interleaved round by round (a busy machine slows them alike)."""
    noise: list[dict[str, float]] = [defaultdict(float)]
    originals = {name: getattr(rng, name) for name in ("initial_noise", "step_noise")}
    for name, fn in originals.items():
        setattr(rng, name, _timed(fn, "noise", lambda: noise[0]))
    rows = [_Row(bundle, steps, sampler_name, n) for bundle, steps, sampler_name in specs]
    try:
        for r in range(rounds):
            for row in rows:
                row.run(r + 1, noise)
    finally:
        for name, fn in originals.items():
            setattr(rng, name, fn)
        for row in rows:
            row.gen.close()
    return [row.result() for row in rows]


def add_ratios(rows: list[dict]) -> None:
    """Each row against its data set's row with the most steps: time (CPU), denoiser time,
    denoiser calls per block and denoiser rows per block (a guided bundle runs two per call),
    baseline / row."""
    for r in rows:
        base = max((b for b in rows if b["dataset"] == r["dataset"]), key=lambda b: b["steps"])
        ms, base_ms = r["ms_per_image"], base["ms_per_image"]
        r["against"] = {"baseline": f"{Path(base['bundle']).stem} {base['steps']} {base['sampler']}",
                        "time_ratio": round(base_ms["generate cpu"] / ms["generate cpu"], 3),
                        "denoiser_time_ratio": round(base_ms["denoiser"] / ms["denoiser"], 3),
                        "call_ratio": round(base["steps"] / r["steps"], 3),
                        "row_ratio": round(base["rows_per_block"] / r["rows_per_block"], 3)}


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, ms per image, and the ratios of `add_ratios`."""
    parts = list(rows[0]["ms_per_image"])
    ratios = list(rows[0]["against"])[1:]
    head = "| bundle | steps | " + " | ".join(parts + [r.replace("_", " ") for r in ratios]) + " |"
    lines = [head, "|" + "---|" * (2 + len(parts) + len(ratios))]
    for r in rows:
        cells = [f"{r['ms_per_image'][p]:.3f}" for p in parts] + [f"{r['against'][k]:.2f}" for k in ratios]
        lines.append(f"| {Path(r['bundle']).stem} | {r['steps']} {r['sampler']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", help="BUNDLE:STEPS:SAMPLER (repeatable; default: the shipped "
                                                     "bundles at their own steps and at 50 ddim)")
    parser.add_argument("-n", type=int, default=8, help="images per generate call (bench times batches of 8)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("-o", "--out", type=Path)
    args = parser.parse_args()
    specs = []
    for spec in args.row or DEFAULT_ROWS:
        path, steps, sampler_name = spec.rsplit(":", 2)
        specs.append((Path(path) if Path(path).is_absolute() else ROOT / path, int(steps), sampler_name))
    rows = measure(specs, args.n, args.rounds)
    add_ratios(rows)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Milliseconds per generated image: the shipped block runtime against whole-latent LDMs
built from trained runs' configs (quality rows d and e), in one run.

    python benchmarks/generation_cost.py RUN... [--bundle models/fashion-mnist.rissole] [--rounds 2]

Answers "what does the block model save at generation time?" next to the FD rows of
benchmarks/results/quality.md. Each measurement is its own child process (bench's or perf.py's), rounds
interleave the contenders so that a shared machine slows them alike; the JSON gives each
contender's median over rounds and its ratio to the block runtime at the same thread count.
The block figure is the whole pipeline (retrieval, int8 denoiser, int8 decoder); a
whole-latent figure is its fp32 denoiser alone in onnxruntime (50 DDIM steps, batches of 8,
random weights: the time does not depend on them), so the ratios favour the whole-latent side.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import perf
from rissole_edge.bench import run_child

STEPS = 50


def _ms_per_image(target: str, threads: int, bundle: str) -> float:
    """One measurement in a fresh process: bench's child for a bundle, perf's for a run (its
    whole-latent denoiser on the bundle's latent geometry)."""
    if target.endswith(".rissole"):
        r = run_child({"bundle": target, "threads": threads, "steps": STEPS, "images": perf.BATCH})
        return 1e3 / r["batched_images_per_s"]
    return 1e3 * perf.spawn("whole_ort", bundle=bundle, config=target, steps=STEPS, threads=threads)["per_image_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="training runs whose denoiser config to time as whole-latent")
    parser.add_argument("--bundle", default=str(Path(__file__).resolve().parent.parent / "models" / "fashion-mnist.rissole"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    targets = [args.bundle, *args.runs]
    times: dict[tuple[str, int], list[float]] = {(t, n): [] for t in targets for n in args.threads}
    for _ in range(args.rounds):
        for key in times:
            times[key].append(_ms_per_image(*key, args.bundle))
    out = []
    for (target, threads), ms in times.items():
        median = statistics.median(ms)
        block = statistics.median(times[(args.bundle, threads)])
        out.append({"target": target, "threads": threads, "ms_per_image": round(median, 1),
                    "ratio_to_block_runtime": round(median / block, 2), "rounds_ms": [round(m, 1) for m in ms]})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

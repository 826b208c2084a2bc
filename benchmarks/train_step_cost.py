"""Seconds per denoiser training step of each quality-ablation config, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/train_step_cost.py [--steps 10] [--threads 1]

Prints JSON: per config the parameter count, the median seconds of one training step
(forward, backward, Adam) at the config's batch size, and the ratio to the shipped model's
config. Steps of the configs are interleaved, so that a busy, shared machine slows them alike;
the ratios are the figures to trust, the seconds only say what this machine did just now.
It answers "how long would this ablation train here?" before spending hours on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rissole_export import config, estimate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"shipped": ROOT / "models" / "fashion-mnist.toml",
           **{p.stem: p for p in sorted((ROOT / "benchmarks" / "ablations").glob("*.toml"), key=lambda p: p.stem)}}
LATENT_CHANNELS, LATENT_SIDE = 4, 8        # Fashion-MNIST 32x32 through the small autoencoder


def _timed(step: Callable[[], None]) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        step()
        return time.perf_counter() - started
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs, seen = {}, []
    for name, path in CONFIGS.items():
        cfg = config.resolve("small", config.read_config_file(path))
        if cfg.denoiser in seen:
            continue                    # a seed variant: the same step as a config already timed
        seen.append(cfg.denoiser)
        params, step = estimate.denoiser_step(cfg.denoiser, LATENT_CHANNELS, LATENT_SIDE)
        step = _timed(step)
        step()                                                  # warm-up
        runs[name] = {"parameters": params, "steps": cfg.denoiser.steps, "times": [], "fn": step}
    for _ in range(args.steps):
        for run in runs.values():
            run["times"].append(run["fn"]())
    base = statistics.median(runs["shipped"]["times"])
    out = {"threads": args.threads, "timed_steps": args.steps, "configs": {}}
    for name, run in runs.items():
        median = statistics.median(run["times"])
        out["configs"][name] = {"parameters": run["parameters"], "seconds_per_step": round(median, 4),
                                "ratio_to_shipped": round(median / base, 2),
                                "hours_for_all_steps": round(median * run["steps"] / 3600, 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

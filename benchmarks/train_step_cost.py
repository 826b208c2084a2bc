"""Seconds per denoiser training step of each quality-ablation config, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/train_step_cost.py [--steps 10] [--threads 1]

Prints JSON: per config the parameter count, the median seconds of one training step
(forward, backward, Adam) at the config's batch size, and the ratio to the shipped model's
config. Steps of the configs are interleaved, so that a busy, shared machine slows them alike;
the ratios are the figures to trust, the seconds only say what this machine did just now.
It answers "how long would this ablation train here?" before spending hours on it.

    python benchmarks/train_step_cost.py --presets

times the autoencoder and denoiser steps of each preset instead (Fashion-MNIST geometry), in CPU
seconds of the one calling thread: other processes on a busy machine barely change that figure,
and on an idle 2-core machine it matched the wall time per step of the shipped model's training
(0.15 s autoencoder, 0.14 s denoiser; models/fashion-mnist.md). The README's CPU training times
are these figures times each preset's steps.
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


def _timed(step: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    def run() -> float:
        started = clock()
        step()
        return clock() - started
    return run


def _preset_steps() -> dict[str, dict]:
    """Each preset's autoencoder and denoiser step at Fashion-MNIST's 32x32 grey, timed in thread CPU time."""
    runs = {}
    for preset in config.PRESETS:
        cfg = config.resolve(preset)
        side = 32 // 2 ** (len(cfg.autoencoder.channel_mult) - 1)
        ae = estimate.autoencoder_step(cfg.autoencoder, 1, 32, cfg.autoencoder.batch_size)
        params, dn = estimate.denoiser_step(cfg.denoiser, cfg.autoencoder.latent_channels, side)
        runs[f"{preset}/autoencoder"] = {"steps": cfg.autoencoder.steps, "fn": _timed(ae, time.thread_time)}
        runs[f"{preset}/denoiser"] = {"parameters": params, "steps": cfg.denoiser.steps, "fn": _timed(dn, time.thread_time)}
    return runs


def _config_steps() -> dict[str, dict]:
    """The denoiser step of the shipped config and of each ablation (seed variants once)."""
    runs, seen = {}, []
    for name, path in CONFIGS.items():
        cfg = config.resolve("small", config.read_config_file(path))
        if cfg.denoiser in seen:
            continue                    # a seed variant: the same step as a config already timed
        seen.append(cfg.denoiser)
        params, step = estimate.denoiser_step(cfg.denoiser, LATENT_CHANNELS, LATENT_SIDE)
        runs[name] = {"parameters": params, "steps": cfg.denoiser.steps, "fn": _timed(step)}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--presets", action="store_true", help="time each preset's autoencoder and denoiser step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs = _preset_steps() if args.presets else _config_steps()
    for run in runs.values():
        run["fn"]()                                             # warm-up
        run["times"] = []
    for _ in range(args.steps):
        for run in runs.values():
            run["times"].append(run["fn"]())
    base = statistics.median(runs["small/denoiser" if args.presets else "shipped"]["times"])
    out = {"threads": args.threads, "timed_steps": args.steps,
           "clock": "thread CPU time" if args.presets else "wall", "configs": {}}
    for name, run in runs.items():
        median = statistics.median(run["times"])
        out["configs"][name] = {"parameters": run.get("parameters"), "seconds_per_step": round(median, 4),
                                "ratio_to_" + ("small_denoiser" if args.presets else "shipped"): round(median / base, 2),
                                "hours_for_all_steps": round(median * run["steps"] / 3600, 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""`rissole-edge bench`: latency and memory of generation, each configuration in its own
child process so that the peak RSS the OS reports belongs to that configuration alone.

A child (`python -m rissole_edge.bench CONFIG_JSON`) opens the bundle, times what it is asked
to, and prints one JSON line with its timings and its peak RSS (VmHWM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()

from . import budget  # noqa: E402  (START must be taken before the heavy imports)
from .timing import median_seconds  # noqa: E402


def _child(cfg: dict) -> dict:
    import numpy as np

    from .generator import Generator
    imported = time.perf_counter()
    out: dict = {"config": cfg}
    gen = Generator.open(cfg["bundle"], memory_budget=cfg.get("budget"), threads=cfg["threads"],
                         spin=cfg.get("spin", True))
    opened = time.perf_counter()
    gen.generate(1, seed=0, steps=cfg["steps"], as_array=True)
    first = time.perf_counter()
    out.update(import_s=imported - START, open_s=opened - imported, first_image_s=first - opened,
               cold_s=first - START, plan=gen.plan.describe())
    n = cfg["images"]
    times = []
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        gen.generate(1, seed=1, first_index=i, steps=cfg["steps"], as_array=True)
        times.append(time.perf_counter() - t0)
    out["warm_image_s"] = float(np.median(times))
    out["warm_image_cpu_s"] = (time.process_time() - cpu0) / n    # all threads: what spinning costs
    t0 = time.perf_counter()
    gen.generate(n, seed=2, steps=cfg["steps"], as_array=True)
    out["batched_images_per_s"] = n / (time.perf_counter() - t0)
    spec = gen.spec
    for blocks in sorted({1, spec.positions, min(gen.plan.blocks_per_call, 256)}):
        feeds = {"x": np.zeros((blocks, spec.latent_channels, spec.block_side, spec.block_side), np.float32),
                 "t": np.full(blocks, 500.0, np.float32), "pos": np.zeros(blocks, np.int64)}
        if spec.k:
            feeds["cond"] = np.zeros((blocks, spec.k * spec.latent_channels, spec.block_side, spec.block_side),
                                     np.float32)
        out[f"denoiser_call_ms_b{blocks}"] = median_seconds(lambda: gen.denoiser.run(["eps"], feeds), 20) * 1e3
    gen.close()
    out["peak_rss_mb"] = budget.rss()[1] / 2 ** 20
    return out


def run_child(cfg: dict, timeout: float = 600) -> dict:
    """Run one configuration in a fresh interpreter and return what it measured."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rissole_edge.bench", json.dumps(cfg)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])})
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        return {"config": cfg, "error": lines[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - t0
    return result


def bench(bundle: Path, quick: bool = False) -> list[dict]:
    """The standard set: default settings, 1 and 2 threads, and (not quick) 2 threads with
    sleeping instead of spinning idle threads, and with a tight memory budget."""
    steps, images = (5, 2) if quick else (50, 8)
    configs = [{"bundle": str(bundle), "threads": t, "steps": steps, "images": images} for t in (1, 2)]
    if not quick:
        configs.append({"bundle": str(bundle), "threads": 2, "steps": steps, "images": images, "spin": False})
        configs.append({"bundle": str(bundle), "threads": 2, "steps": steps, "images": images, "budget": "minimum"})
    results = []
    for cfg in configs:
        if cfg.get("budget") == "minimum":
            cfg["budget"] = minimum_budget(bundle)
        results.append(run_child(cfg))
    return results


def minimum_budget(bundle: Path) -> int:
    """The smallest budget the runtime accepts for this bundle, asked of a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "rissole_edge", "generate", "-m", str(bundle),
                               "--memory-budget", "1MB", "-o", tmp], capture_output=True, text=True)
    text = proc.stderr.strip()
    if "at least " not in text:
        raise RuntimeError(f"could not learn the minimum budget: {text}")
    return (int(text.split("at least ")[1].rstrip("MB")) + 1) * 2 ** 20


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))

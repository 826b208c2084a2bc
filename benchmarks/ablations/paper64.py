"""The paper's claim at 64x64 (issue 17, item 4): block + retrieval against block without
retrieval and whole-latent LDMs with the same and 4x the parameters, on one training base.

Every row is twemoji-v2's recipe (benchmarks/ablations/recipes/twemoji-v2.toml, the teacher
shipped until stop 27) with one change, trained on the autoencoder and neighbour database of one finished run (`--base`, the
twemoji-v2 run), so the rows differ only in their denoiser:

    block         the recipe as it is (border strips, seam loss)
    noretrieval   kind = "block-noretrieval" (the neighbour blocks replaced by nothing)
    whole         kind = "whole", 64 channels: the same parameter count (border and seam loss
                  need adjacent blocks, so they go too)
    whole-4x      kind = "whole", 128 channels: 3.97x the parameters
    block-w4      border = 4 (half a block of each adjacent block's x_t, instead of 2 rows)
    block-w8      border = 8: every block sees its whole image's x_t (item 2: does shared
                  context make blocks agree, as the whole-latent rows do?)
    block-w8-sc   border = 8 and self_condition: the window also carries the previous call's
                  x0 estimate of the whole image (what the other blocks are becoming)
    block-xb      cross_block: the blocks of an image attend to each other at the bottleneck
                  (a batch then holds 16 whole images; seam_loss 0)
    block-xb-seam cross_block with the recipe's seam loss, over every adjacent pair of those images

    python benchmarks/ablations/paper64.py train ROW --seed S --steps N --out RUN --base BASE [--max-minutes M]
    python benchmarks/ablations/paper64.py cost [--steps 4]
    rissole-edge evaluate RUN -n 1000 --json           # FD, KID, seams, copying: torch, DDIM-50

`train` continues a run it finds (checkpoints every 500 steps), so a stopped session loses at
most that much. `cost` prints JSON: each row's parameter count and the thread CPU seconds of
one training step at the recipe's batch size (one torch thread, rows interleaved, so a busy
machine slows them alike). At the same batch a whole-latent step denoises four blocks' worth
of latent per sample, so it costs about 4x a block step: quality at equal steps and at equal
training cost are different comparisons, and the JSON gives what converts one to the other.
For generation it counts, from each row's fp32 ONNX graph, the multiply-accumulates and the
activation bytes one image costs per denoiser call (a block row: all its blocks; counted from
shapes, so a busy machine cannot move them): what the block design saves, or does not, at
generation time and in the memory a call in flight holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rissole_edge.errors import RissoleError
from rissole_export import config, denoiser, estimate, graph, onnx_export, train

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "benchmarks" / "ablations" / "recipes" / "twemoji-v2.toml"
ROWS: dict[str, dict[str, Any]] = {
    "block": {},
    "noretrieval": {"kind": "block-noretrieval"},
    "whole": {"kind": "whole", "border": 0, "seam_loss": 0.0},
    "whole-4x": {"kind": "whole", "border": 0, "seam_loss": 0.0, "channels": 128},
    "block-w4": {"border": 4},
    "block-w8": {"border": 8},
    "block-w8-sc": {"border": 8, "self_condition": True},
    "block-xb": {"cross_block": True, "seam_loss": 0.0},
    "block-xb-seam": {"cross_block": True},
}
LATENT_CHANNELS, LATENT_SIDE = 4, 16      # 64x64 through the twemoji-v2 autoencoder


def row_overrides(row: str, seed: int, steps: int) -> dict[str, Any]:
    """The recipe's overrides with the row's one change, the seed and the step budget."""
    recipe = config.read_config_file(RECIPE)
    denoiser = {**recipe["denoiser"], **ROWS[row], "steps": steps}
    return {**recipe, "denoiser": denoiser, "seed": seed}


def train_row(row: str, seed: int, steps: int, out: Path, base: Path, max_minutes: float | None) -> dict:
    """Train the row into `out`, or continue it there. A run continued with more --steps is
    extended (the recipe's steps only bound the loop: the learning rate is constant), so
    the same row can be read at 2,000 steps and then at 8,000 without starting again."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(row_overrides(row, seed, steps)))
        resume = (out / "denoiser.safetensors").exists()
        if resume:
            extend_run(out, config.resolve("small", row_overrides(row, seed, steps)))
        return train.train("twemoji", out, None if resume else "small", None if resume else path, "denoiser", max_minutes,
                           resume=resume, progress=True, reuse=None if resume else base,
                           log=lambda msg: print(msg, flush=True))


def refuse(message: str) -> None:
    """A usage error: one line, exit 2."""
    print(message, file=sys.stderr)
    sys.exit(2)


def extend_run(out: Path, wanted: config.RunConfig) -> None:
    """Refuse a run of another row or seed; raise a finished run's step bound to `wanted`'s."""
    stored = config.load(out / "config.json")
    wanted.data.source = stored.data.source
    wanted_steps, wanted.denoiser.steps = wanted.denoiser.steps, stored.denoiser.steps
    diff = config.first_difference(stored, wanted, ("denoiser",)) or (
        None if stored.seed == wanted.seed else f"seed ({stored.seed} vs {wanted.seed})")
    if diff:
        refuse(f"{out} holds another row or seed: {diff}")
    if wanted_steps < stored.denoiser.steps:
        refuse(f"{out} is a {stored.denoiser.steps}-step run: --steps {wanted_steps} cannot shorten it")
    stored.denoiser.steps = wanted_steps
    config.save(stored, out / "config.json")


def step_costs(timed_steps: int) -> dict:
    """Thread CPU seconds per training step of each row, interleaved."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    runs = {}
    for row in ROWS:
        cfg = config.resolve("small", row_overrides(row, 0, 1))
        params, step = estimate.denoiser_step(cfg.denoiser, LATENT_CHANNELS, LATENT_SIDE)
        step()                                                  # warm-up
        runs[row] = {"parameters": params, "step": step, "times": [], "cfg": cfg.denoiser}
    for _ in range(timed_steps):
        for run in runs.values():
            started = time.thread_time()
            run["step"]()
            run["times"].append(time.thread_time() - started)
    block = statistics.median(runs["block"]["times"])
    return {"clock": "thread CPU time, 1 torch thread", "timed_steps": timed_steps,
            "rows": {row: {"parameters": run["parameters"],
                           "seconds_per_step": round(statistics.median(run["times"]), 3),
                           "ratio_to_block": round(statistics.median(run["times"]) / block, 2),
                           **generation_cost(run["cfg"])}
                     for row, run in runs.items()}}


def generation_cost(cfg: config.DenoiserConfig) -> dict[str, int]:
    """MACs and activation bytes per image per denoiser call, from the row's fp32 ONNX graph
    (graph.py counts per block; a cross_block graph's attention is shared out over its blocks)."""
    net = denoiser.build(cfg, LATENT_CHANNELS, LATENT_SIDE).eval()
    model = onnx_export.denoiser(net)
    calls = 1 if cfg.kind == "whole" else cfg.blocks_per_side ** 2
    return {"macs_per_image_call": calls * sum(graph.node_macs(model).values()),
            "activation_bytes_per_image_call": calls * graph.activation_bytes(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or continue) one row")
    t.add_argument("row", choices=sorted(ROWS))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, required=True, help="denoiser steps (the recipe's batch)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--base", type=Path, required=True, help="finished run whose autoencoder and database to use")
    t.add_argument("--max-minutes", type=float)
    c = sub.add_parser("cost", help="seconds per training step of each row, as JSON")
    c.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if args.command == "train":
        torch.set_num_threads(1)
        try:
            print(json.dumps(train_row(args.row, args.seed, args.steps, args.out, args.base, args.max_minutes)))
        except RissoleError as e:            # a missing --base, a run of other data: one line
            refuse(f"error: {e}")
    else:
        print(json.dumps(step_costs(args.steps), indent=2))


if __name__ == "__main__":
    main()

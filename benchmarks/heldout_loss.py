"""Held-out denoising loss of runs: does more training still help, or does it overfit?

    python benchmarks/heldout_loss.py RUN [RUN ...] [--json OUT]

For each run (its EMA denoiser, torch fp32): the epsilon MSE on the held-out test images and
on as many training images (drawn with seed 0), every block of every image at seven fixed
timesteps, with the same noise for every run, so runs on one base (the same autoencoder and
database, e.g. one run and its extension) compare pair by pair. A training loss that keeps
falling while the test loss stops is overfitting; the per-timestep figures say where a run
gains (low t: detail; high t: layout, where blocks decide what they show).

Neighbours: a training image's k nearest from its own neighbour list; a test image's k
nearest training images by the database key (exact search on the PCA keys; training images
with the test image's exact codes are skipped, as the database skips duplicates; keys are
unit vectors, so `database.exact_knn`'s cosine order is the distance order). Runs must
share the first run's autoencoder and database (`--reuse`/extensions of one base).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rissole_edge import blocks
from rissole_edge.retrieval import keys_of, project
from rissole_export import data, database
from rissole_export.sampling import RunModels
from rissole_export.train import noisy_batch

TIMESTEPS = (50, 150, 300, 450, 600, 750, 900)
BATCH = 256


def test_set(m: RunModels, pixels: np.ndarray, folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    """Scaled block latents (N, P, C, s, s) of `pixels` and each one's k nearest database entries."""
    cfg, bps = m.cfg, m.cfg.denoiser.blocks_per_side
    codes = database.encode(m.ae, pixels)
    latents = database.code_latents(m.ae.codebook.embedding.detach().numpy().astype(np.float32), codes)
    pca = np.load(folder / "pca.npz", allow_pickle=False)
    keys = project(keys_of(latents, cfg.database.key, bps), pca["mean"], pca["components"])
    db_codes = m.db.codes.reshape(len(m.db.codes), -1)
    # enough candidates that k remain once a whole group of duplicates is skipped
    want = cfg.denoiser.k + int(np.bincount(database.duplicate_groups(db_codes)).max())
    order = database.exact_knn(np.load(folder / "keys.npy", allow_pickle=False), keys, want)
    own = blocks.split(codes[:, None], bps)[:, :, 0].reshape(len(codes), -1)
    neighbours = np.array([[j for j in row if not np.array_equal(db_codes[j], mine)][:cfg.denoiser.k]
                           for row, mine in zip(order, own)])
    split = blocks.split(latents, bps) * m.scale
    return torch.from_numpy(np.ascontiguousarray(split)).float(), neighbours


@torch.no_grad()
def losses(m: RunModels, latents: torch.Tensor, neighbours: np.ndarray) -> dict[int, float]:
    """Epsilon MSE at each of TIMESTEPS, every block of every image, noise seeded by t."""
    n, positions = latents.shape[:2]
    pos = torch.arange(positions).repeat(n, 1)
    cond = m.latents[torch.from_numpy(neighbours)].permute(0, 2, 1, 3, 4, 5).reshape(n * positions, -1,
                                                                                    *latents.shape[-2:])
    out = {}
    for step in TIMESTEPS:
        t = torch.full((n,), step)
        x_t, noise, window = noisy_batch(m.diffusion, latents, pos, t, torch.Generator().manual_seed(1000 + step),
                                         m.net.border, m.cfg.denoiser.blocks_per_side)
        flat_t, flat_pos = t.repeat_interleave(positions).float(), pos.reshape(-1)
        pred = torch.cat([m.net(x_t[i:i + BATCH], flat_t[i:i + BATCH], flat_pos[i:i + BATCH], cond[i:i + BATCH],
                                None if window is None else window[i:i + BATCH])
                          for i in range(0, n * positions, BATCH)])
        out[step] = float(((pred - noise) ** 2).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    first = RunModels.load(args.runs[0])
    if first.cfg.denoiser.kind != "block" or not first.cfg.denoiser.k:
        parser.error("block runs with retrieval only")
    images = data.load(first.cfg.data.source, first.cfg.data)
    test_latents, test_neighbours = test_set(first, images.test, args.runs[0] / "database")
    pick = np.random.default_rng(0).choice(len(images.train), len(images.test), replace=False)
    train_latents = first.latents[torch.from_numpy(pick)]
    train_neighbours = np.asarray(first.db.neighbours)[pick][:, :first.cfg.denoiser.k]
    result = {"timesteps": list(TIMESTEPS), "images": len(images.test), "runs": {}}
    for run in args.runs:
        m = RunModels.load(run)
        test, train = losses(m, test_latents, test_neighbours), losses(m, train_latents, train_neighbours)
        result["runs"][str(run)] = {"test": float(np.mean(list(test.values()))),
                                    "train": float(np.mean(list(train.values()))),
                                    "test_per_t": test, "train_per_t": train}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

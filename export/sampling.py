"""Generating images with the torch models of a run: sample grids during training, and the
reference that the exported runtime is checked against.

Randomness is per image (numpy, seeded by (seed, image index)) so that image i of a batch is
the same image when generated alone, in torch and in the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rissole_edge import blocks, rng
from rissole_edge.retrieval import draw_neighbours

from . import checkpoint, config, denoiser
from .autoencoder import VQAutoencoder
from .database import Database, code_latents
from .diffusion import Diffusion
from .pixels import to_pixels


@dataclass
class RunModels:
    """Everything a trained run generates with."""
    cfg: config.RunConfig
    ae: VQAutoencoder
    net: denoiser.UNet
    db: Database
    latents: torch.Tensor     # (N, P, C, s, s) scaled neighbour blocks
    diffusion: Diffusion

    @property
    def scale(self) -> float:
        return self.db.meta["latent_scale"]

    @classmethod
    def load(cls, run: Path, weights: str = "ema") -> "RunModels":
        cfg = config.load(run / "config.json")
        db = Database.load(run / "database")
        ae = load_autoencoder(run, cfg)
        net = denoiser.build(cfg.denoiser, db.meta["latent_channels"], db.meta["latent_side"])
        net.load_state_dict(checkpoint.load_weights(run / "denoiser.safetensors", weights))
        net.eval()
        latents = block_latents(ae, db, whole=cfg.denoiser.kind == "whole")
        return cls(cfg, ae, net, db, latents, Diffusion(cfg.denoiser.schedule, cfg.denoiser.timesteps))


def load_autoencoder(run: Path, cfg: config.RunConfig) -> VQAutoencoder:
    ae = VQAutoencoder(cfg.data.channels, cfg.autoencoder)
    ae.load_state_dict(checkpoint.load_weights(run / "autoencoder.safetensors", "model"))
    return ae.eval()


def block_latents(ae: VQAutoencoder, db: Database, whole: bool) -> torch.Tensor:
    """The database's latents, scaled, as (N, P, C, s, s); P = 1 for the whole-latent model."""
    codebook = ae.codebook.embedding.detach().numpy()
    latents = code_latents(codebook, db.codes) * db.meta["latent_scale"]
    if whole:
        latents = blocks.join(latents, db.meta["blocks_per_side"])[:, None]
    return torch.from_numpy(np.ascontiguousarray(latents)).float()


@torch.no_grad()
def generate(m: RunModels, query_ids: list[int], seed: int, steps: int = 50,
             sampler: str = "ddim", guidance: float = 1.0,
             on_call: Callable[[dict[str, np.ndarray]], None] | None = None) -> np.ndarray:
    """Images (n, H, W, C) uint8: one per query id, conditioned on that entry's neighbours.
    `on_call` sees the inputs of every denoiser call (the exporter calibrates int8 on them)."""
    latent = generate_latents(m.net, m.latents, np.asarray(m.db.neighbours), m.diffusion, query_ids, seed,
                              steps, sampler, guidance, on_call)
    return to_pixels(m.ae.decode_latent(torch.from_numpy(latent) / m.scale))


@torch.no_grad()
def generate_latents(net: denoiser.UNet, latents: torch.Tensor, neighbours: np.ndarray, diffusion: Diffusion,
                     query_ids: list[int], seed: int, steps: int = 50, sampler: str = "ddim",
                     guidance: float = 1.0,
                     on_call: Callable[[dict[str, np.ndarray]], None] | None = None) -> np.ndarray:
    """The scaled latents (n, C, H, W) that `generate` decodes, from a denoiser, the database's
    block latents (N, P, C, s, s) and its neighbour lists. A border-conditioned denoiser gets,
    at every call, each block's window of its own image's current x_t; a self-conditioned one
    also the window of the x0 estimate of the previous call (guided, as the step used it)."""
    positions = latents.shape[1]
    b = int(round(positions ** 0.5))
    c, s = net.latent_channels, net.block_size
    shape = (positions, c, s, s)
    images = range(len(query_ids))
    x = torch.from_numpy(np.stack([rng.initial_noise(seed, i, shape) for i in images]))
    pos = torch.arange(positions).repeat(len(query_ids))
    cond = None
    if net.k:
        picks = [draw_neighbours(neighbours[q], net.k, rng.neighbour_rng(seed, i))
                 for i, q in enumerate(query_ids)]
        nb = latents[torch.from_numpy(np.stack(picks)).long()]          # (n, k, P, C, s, s)
        cond = nb.permute(0, 2, 1, 3, 4, 5).reshape(-1, net.k * c, s, s)

    estimate = torch.zeros(len(query_ids) * positions, c, s, s)

    def eps_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal estimate
        window = None
        if net.border:
            seen = torch.cat([xt, estimate], dim=1) if net.self_condition else xt
            window = denoiser.windows(seen.reshape(len(query_ids), positions, -1, s, s), b, net.border).flatten(0, 1)
        if on_call is not None:
            feeds = {"x": xt.numpy(), "t": t.numpy(), "pos": pos.numpy()}
            if cond is not None:
                feeds["cond"] = cond.numpy()
            if window is not None:
                feeds["window"] = window.numpy()
            on_call(feeds)
        eps = net(xt, t, pos, cond, window)
        if cond is not None and guidance != 1.0:
            uncond = net(xt, t, pos, torch.zeros_like(cond), window)
            eps = uncond + guidance * (eps - uncond)
        if net.self_condition:
            estimate = denoiser.x0_estimate(xt, eps, diffusion.alpha_bar[t.long()].view(-1, 1, 1, 1))
        return eps

    def noise_fn(step: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([rng.step_noise(seed, i, step, shape) for i in images])).reshape(-1, c, s, s)

    out = diffusion.sample(eps_fn, x.reshape(-1, c, s, s), steps, sampler, noise_fn)
    return blocks.join(out.reshape(len(query_ids), positions, c, s, s).numpy(), b)

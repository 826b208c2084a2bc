"""How long a training run will take on this machine, from a few timed steps, before it starts.

A newcomer who starts the small preset on a laptop should learn within seconds that it takes
an hour, not after 161 steps. Each stage's step is timed on random data of the run's exact
geometry (the cost of a step does not depend on the pixel values), on the run's device, with
torch's global RNG forked so that the run itself draws exactly what it would have drawn.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import hnswlib
import numpy as np
import torch
from torch.nn import functional as F

from rissole_edge.progress import duration

from . import denoiser
from .autoencoder import PatchDiscriminator, VQAutoencoder
from .config import AutoencoderConfig, DenoiserConfig, RunConfig
from .layers import count_parameters

Step = Callable[[], None]
HNSW_SAMPLE = 2000          # keys indexed to time the HNSW build, extrapolated linearly


def median_seconds(step: Step, repeats: int, device: torch.device) -> float:
    """Median wall time of `step` after one warm-up call (allocations, kernel selection)."""
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def denoiser_step(cfg: DenoiserConfig, latent_channels: int, latent_side: int,
                  device: torch.device = torch.device("cpu")) -> tuple[int, Step]:
    """(parameter count, one full training step on random data: forward, backward, Adam)."""
    net = denoiser.build(cfg, latent_channels, latent_side).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    block, positions = denoiser.geometry(cfg, latent_side)
    b = cfg.batch_size
    x = torch.randn(b, latent_channels, block, block, device=device)
    pos = torch.randint(positions, (b,), device=device)
    t = torch.randint(cfg.timesteps, (b,), device=device).float()
    cond = torch.randn(b, net.k * latent_channels, block, block, device=device) if net.k else None
    side = block + 2 * net.border
    window_channels = latent_channels * (2 if net.self_condition else 1)
    window = torch.randn(b, window_channels, side, side, device=device) if net.border else None
    # self-conditioning's first call: every block of half the batch's images, no gradient
    images = b // 2 if cfg.seam_loss else b
    first = torch.arange(images // 2 * positions, device=device) % b if net.self_condition else None

    def step() -> None:
        if first is not None:
            with torch.no_grad():
                net(x[first], t[first], pos[first], None if cond is None else cond[first], window[first])
        loss = denoiser.epsilon_loss(net, x, t, pos, cond, torch.randn_like(x), window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return count_parameters(net), step


def autoencoder_step(cfg: AutoencoderConfig, channels: int, size: int, batch: int,
                     device: torch.device = torch.device("cpu")) -> Step:
    """One autoencoder training step on random images, with the discriminator if configured."""
    ae = VQAutoencoder(channels, cfg).to(device)
    disc = PatchDiscriminator(channels).to(device) if cfg.disc_weight > 0 else None
    params = list(ae.parameters()) + (list(disc.parameters()) if disc is not None else [])
    opt = torch.optim.Adam(params, lr=cfg.lr)
    x = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        out = ae(x)
        loss = F.l1_loss(out["recon"], x) + F.mse_loss(out["recon"], x) + out["codebook_loss"]
        if disc is not None:
            loss = loss - cfg.disc_weight * disc(out["recon"]).mean() + F.relu(1 - disc(x)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ae.codebook.restart(out["z"].detach(), out["indices"], g)

    return step


def database_seconds(cfg: RunConfig, channels: int, images: int, device: torch.device) -> float:
    """Encoding every training image plus building the HNSW index, timed on samples. The key
    study and neighbour lists come on top; they are small beside these two."""
    ae = VQAutoencoder(channels, cfg.autoencoder).to(device).eval()
    batch = min(images, 512)
    x = torch.rand(batch, channels, cfg.data.size, cfg.data.size, device=device) * 2 - 1
    with torch.no_grad():
        encode = median_seconds(lambda: ae.encode_indices(x), 1, device) * images / batch
    side = cfg.data.size // 2 ** (len(cfg.autoencoder.channel_mult) - 1)
    dim = cfg.database.key_dim or cfg.autoencoder.latent_channels * side * side
    n = min(images, HNSW_SAMPLE)
    keys = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    started = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=n, M=cfg.database.hnsw_m, ef_construction=cfg.database.ef_construction)
    index.add_items(keys, np.arange(n), num_threads=1)
    return encode + (time.perf_counter() - started) * images / n


def estimate(cfg: RunConfig, channels: int, images: int, remaining: dict[str, int], world: int,
             device: torch.device, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Seconds per stage still to run. `remaining` maps a stage to its steps left (the database
    to 1); per-step stages report their seconds per step too."""
    out: dict[str, dict[str, float]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if "autoencoder" in remaining:
            batch = max(1, cfg.autoencoder.batch_size // world)
            per_step = median_seconds(autoencoder_step(cfg.autoencoder, channels, cfg.data.size, batch, device),
                                      repeats, device)
            out["autoencoder"] = {"steps": remaining["autoencoder"], "seconds_per_step": per_step,
                                  "seconds": per_step * remaining["autoencoder"]}
        if "database" in remaining:
            out["database"] = {"seconds": database_seconds(cfg, channels, images, device)}
        if "denoiser" in remaining:
            side = cfg.data.size // 2 ** (len(cfg.autoencoder.channel_mult) - 1)
            dn = cfg.denoiser
            local = dataclasses.replace(dn, batch_size=max(1, dn.batch_size // world))
            _, step = denoiser_step(local, cfg.autoencoder.latent_channels, side, device)
            per_step = median_seconds(step, repeats, device)
            out["denoiser"] = {"steps": remaining["denoiser"], "seconds_per_step": per_step,
                               "seconds": per_step * remaining["denoiser"]}
    return out


def describe(est: dict[str, dict[str, float]]) -> str:
    """One line: each stage's share and the total."""
    parts = []
    for stage, e in est.items():
        if "steps" in e:
            parts.append(f"{stage} {e['steps']:,} steps x {e['seconds_per_step']:.3g} s = {duration(e['seconds'])}")
        else:
            parts.append(f"{stage} about {duration(e['seconds'])}")
    total = sum(e["seconds"] for e in est.values())
    return (f"estimate: about {duration(total)} on this machine ({'; '.join(parts)}; timed from a few "
            "steps each: a busy machine takes longer)")

"""Noise schedules and sampling timesteps, in numpy.

This module is shared: the toolchain trains with these schedules and the runtime samples with
them, so the two can never disagree about what `alpha_bar[t]` is.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "cosine")


def alphas_cumprod(kind: str, timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> np.ndarray:
    """Return alpha_bar[t] = prod_{s<=t} (1 - beta_s) for t in [0, timesteps), as float64.

    `linear` is the DDPM schedule of the paper (betas linear in [beta_start, beta_end]);
    `cosine` is Nichol & Dhariwal's, which keeps more signal at mid timesteps and often
    suits small latents better.
    """
    if kind == "linear":
        betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    elif kind == "cosine":
        s = 0.008
        steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    else:
        raise ValueError(f"unknown noise schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
    return np.cumprod(1.0 - betas)


def sampling_timesteps(timesteps: int, steps: int) -> np.ndarray:
    """The `steps` training timesteps a sampler visits, from most to least noisy.

    Evenly spaced and always including t = timesteps - 1 (pure noise) and t = 0, so that any
    step count from 1 to `timesteps` starts from noise and ends on a clean latent.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    if steps == 1:
        return np.array([timesteps - 1], dtype=np.int64)
    return np.round(np.linspace(timesteps - 1, 0, steps)).astype(np.int64)

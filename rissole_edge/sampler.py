"""DDIM and DDPM update rules in numpy, apart from any model (diffusers-scheduler style).

`sample` drives an `eps_fn(x, t) -> eps` callable (an onnxruntime session in the runtime)
over the timesteps of `rissole_edge.schedule.sampling_timesteps`. DDPM is the same update
with eta = 1, i.e. the posterior variance of the original DDPM.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .schedule import sampling_timesteps

SAMPLERS = {"ddim": 0.0, "ddpm": 1.0}   # name -> eta


def step(x: np.ndarray, eps: np.ndarray, a_t: float, a_prev: float, eta: float,
         noise: np.ndarray | None) -> np.ndarray:
    """One generalised DDIM step from alpha_bar a_t to a_prev (float64 scalars)."""
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    out = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma * sigma, 0.0)) * eps
    if sigma > 0.0:
        out = out + sigma * noise
    return out.astype(np.float32)


def sample(eps_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], x: np.ndarray,
           alpha_bar: np.ndarray, steps: int, sampler: str,
           noise_fn: Callable[[int], np.ndarray] | None = None,
           on_step: Callable[[], None] | None = None) -> np.ndarray:
    """Denoise x (noise at t = T-1) in `steps` steps; `noise_fn(i)` gives step i's DDPM noise."""
    eta = SAMPLERS[sampler]
    ts = sampling_timesteps(len(alpha_bar), steps)
    for i, t in enumerate(ts):
        a_prev = float(alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, np.full(len(x), float(t), dtype=np.float32))
        last = i + 1 == len(ts)
        x = step(x, eps, float(alpha_bar[t]), a_prev, eta, None if eta == 0 or last else noise_fn(i))
        if on_step is not None:
            on_step()
    return x

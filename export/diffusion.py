"""Epsilon-prediction diffusion in torch: forward noising for training, DDIM/DDPM sampling.

The schedule comes from the runtime (`rissole_edge.schedule`), so training and the edge
sampler use the same alpha_bar. This torch sampler is the reference the numpy runtime sampler
is tested against; it is written independently of it on purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rissole_edge.schedule import alphas_cumprod, sampling_timesteps

SAMPLERS = {"ddim": 0.0, "ddpm": 1.0}   # sampler name -> eta (DDPM is DDIM with eta = 1)

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Diffusion:
    def __init__(self, schedule: str = "linear", timesteps: int = 1000):
        self.timesteps = timesteps
        self.alpha_bar = torch.from_numpy(alphas_cumprod(schedule, timesteps))   # float64

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(a) x0 + sqrt(1 - a) noise, one timestep per sample."""
        a = self.alpha_bar.to(x0.device)[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x: torch.Tensor, steps: int, sampler: str = "ddim",
               noise_fn: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Denoise `x` (pure noise at t = T-1) in `steps` steps.

        `eps_fn(x, t)` predicts the noise; `noise_fn(i)` gives the fresh noise of step i for
        stochastic samplers (DDPM), so that a caller can reproduce a run exactly.
        """
        eta = SAMPLERS[sampler]
        ts = sampling_timesteps(self.timesteps, steps).tolist()
        for i, t in enumerate(ts):
            a_t = self.alpha_bar[t]
            a_prev = self.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            eps = eps_fn(x, torch.full((x.shape[0],), float(t), device=x.device))
            x0 = (x - (1 - a_t).sqrt().float() * eps) / a_t.sqrt().float()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            x = a_prev.sqrt().float() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt().float() * eps
            if eta > 0 and i + 1 < len(ts):
                if noise_fn is None:
                    raise ValueError("the DDPM sampler needs noise_fn")
                x = x + sigma.float() * noise_fn(i)
        return x

"""Epsilon-prediction diffusion in torch: forward noising for training, and the reference samplers.

The schedule comes from the runtime (`rissole_edge.schedule`), so training and the edge
sampler use the same alpha_bar, and the sampler names come from the runtime's registry
(`rissole_edge.sampler.SAMPLERS`). The update rules here are written independently of the
numpy ones on purpose, in another parameterisation: DDIM/DDPM in alpha_bar, DPM-Solver++ in
k-diffusion's variance-exploding form (x / alpha, sigma / alpha, t = -log sigma), so that a
parity test between the two catches a slip in either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rissole_edge.sampler import SAMPLERS as REGISTRY
from rissole_edge.schedule import alphas_cumprod, sampling_timesteps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]


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
               noise_fn: NoiseFn | None = None) -> torch.Tensor:
        """Denoise `x` (pure noise at t = T-1) in `steps` model calls.

        `eps_fn(x, t)` predicts the noise; `noise_fn(i)` gives the fresh noise of step i for
        stochastic samplers (DDPM), so that a caller can reproduce a run exactly."""
        if sampler not in REGISTRY:
            raise ValueError(f"unknown sampler {sampler!r}")
        ts = sampling_timesteps(self.timesteps, steps).tolist()
        return _METHODS[sampler](self, eps_fn, x, ts, noise_fn)

    def _ddim(self, eps_fn: EpsFn, x: torch.Tensor, ts: list[int], noise_fn: NoiseFn | None,
              eta: float = 0.0) -> torch.Tensor:
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

    def _ddpm(self, eps_fn: EpsFn, x: torch.Tensor, ts: list[int], noise_fn: NoiseFn | None) -> torch.Tensor:
        return self._ddim(eps_fn, x, ts, noise_fn, eta=1.0)

    def _dpmpp(self, eps_fn: EpsFn, x: torch.Tensor, ts: list[int], order: int) -> torch.Tensor:
        """DPM-Solver++(order)M after k-diffusion's sample_dpmpp_2m / sample_dpmpp_3m_sde (eta 0),
        on the VE variable x / alpha; warm-up and the last transitions use lower orders, and the
        order-2 step is 2M's (1 + 1/2r) D - 1/2r D_prev."""
        a = self.alpha_bar[ts]
        scale = a.sqrt()                              # VP alpha: x_vp = scale * x_ve
        sigmas = ((1 - a) / a).sqrt()                 # VE sigma of each visited timestep
        xe = x.double() / scale[0]
        denoised: list[torch.Tensor] = []
        for i, t in enumerate(ts):
            x_vp = (xe * scale[i]).float()
            eps = eps_fn(x_vp, torch.full((x.shape[0],), float(t), device=x.device))
            denoised.append(((x_vp - (1 - a[i]).sqrt().float() * eps) / scale[i].float()).double())
            if i + 1 == len(ts):
                return denoised[-1].float()
            s_now, s_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s_next - s_now
            used = min(order, i + 1, len(ts) - 1 - i)
            xe = (sigmas[i + 1] / sigmas[i]) * xe - torch.expm1(-h) * denoised[-1]
            if used == 2:
                r = (s_now - (-sigmas[i - 1].log())) / h
                xe = xe - torch.expm1(-h) * (denoised[-1] - denoised[-2]) / (2 * r)
            elif used == 3:
                h_1 = s_now + sigmas[i - 1].log()
                h_2 = -sigmas[i - 1].log() + sigmas[i - 2].log()
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised[-1] - denoised[-2]) / r0
                d1_1 = (denoised[-2] - denoised[-3]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = torch.expm1(-h) / h + 1
                phi_3 = phi_2 / h - 0.5
                xe = xe + phi_2 * d1 - phi_3 * d2
        raise AssertionError("unreachable: the loop returns at the last timestep")

    def _dpmpp_2m(self, eps_fn: EpsFn, x: torch.Tensor, ts: list[int], noise_fn: NoiseFn | None) -> torch.Tensor:
        return self._dpmpp(eps_fn, x, ts, 2)

    def _dpmpp_3m(self, eps_fn: EpsFn, x: torch.Tensor, ts: list[int], noise_fn: NoiseFn | None) -> torch.Tensor:
        return self._dpmpp(eps_fn, x, ts, 3)


_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": Diffusion._ddim, "ddpm": Diffusion._ddpm,
    "dpmpp-2m": Diffusion._dpmpp_2m, "dpmpp-3m": Diffusion._dpmpp_3m,
}
if set(_METHODS) != set(REGISTRY):     # a sampler registered in the runtime without a reference
    raise ImportError(f"torch reference samplers {sorted(_METHODS)} differ from the registry {sorted(REGISTRY)}")

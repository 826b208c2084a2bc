"""The sampler registry: one numpy function per sampler, apart from any model (in the style of
diffusers' schedulers and k-diffusion's samplers).

Every sampler has the signature of `SamplerFn`: it drives an `eps_fn(x, t) -> eps` callable (an
onnxruntime session in the runtime) over the training timesteps `ts` that
`rissole_edge.schedule.sampling_timesteps` chose, one model call per timestep, and after the
last one returns the clean latent. `on_step(i, x0)` sees, after step i, the model's current
prediction of the clean latent (progress bars, previews).

- `ddim`: deterministic DDIM (eta = 0), first order.
- `ddpm`: the same update with eta = 1, i.e. the posterior variance of the original DDPM; the
  fresh noise of step i comes from `noise_fn(i)`.
- `dpmpp-2m`, `dpmpp-3m`: DPM-Solver++ multistep, data prediction, of order 2 and 3
  (Lu et al. 2022): they reuse the previous steps' x0 predictions, so a higher order costs no
  extra model call. They start at first order (no history yet) and drop order again over the
  last transitions (diffusers' `lower_order_final`), so that at 1-3 steps they degrade to
  DDIM instead of extrapolating from a history that does not exist.

Every update is elementwise per row, so image i is the same alone or in a batch.
`rissole_export.diffusion` holds an independent torch implementation that tests compare with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:    # numpy is imported on first use: the CLI reads the registry for --help
    import numpy as np

EpsFn = Callable[["np.ndarray", "np.ndarray"], "np.ndarray"]
NoiseFn = Callable[[int], "np.ndarray"]
StepFn = Callable[[int, "np.ndarray"], None]
SamplerFn = Callable[[EpsFn, "np.ndarray", "np.ndarray", "np.ndarray", "NoiseFn | None", "StepFn | None"],
                     "np.ndarray"]


def _eps(eps_fn: EpsFn, x: np.ndarray, t: int) -> np.ndarray:
    import numpy as np

    return eps_fn(x, np.full(len(x), float(t), dtype=np.float32))


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype("float32", copy=False)


def _x0(x: np.ndarray, eps: np.ndarray, a_t: float) -> np.ndarray:
    """The data prediction: the clean latent that eps says x came from."""
    return _f32((x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t))


def _generalised_ddim(eta: float) -> SamplerFn:
    def run(eps_fn: EpsFn, x: np.ndarray, alpha_bar: np.ndarray, ts: np.ndarray,
            noise_fn: NoiseFn | None = None, on_step: StepFn | None = None) -> np.ndarray:
        for i, t in enumerate(ts):
            a_t = float(alpha_bar[t])
            a_prev = float(alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            eps = _eps(eps_fn, x, t)
            x0 = _x0(x, eps, a_t)
            sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
            x = _f32(math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma * sigma, 0.0)) * eps)
            if sigma > 0.0:
                if noise_fn is None:
                    raise ValueError("a stochastic sampler needs noise_fn")
                x = _f32(x + sigma * noise_fn(i))
            if on_step is not None:
                on_step(i, x0)
        return x
    return run


def _dpm_solver_pp(order: int) -> SamplerFn:
    def run(eps_fn: EpsFn, x: np.ndarray, alpha_bar: np.ndarray, ts: np.ndarray,
            noise_fn: NoiseFn | None = None, on_step: StepFn | None = None) -> np.ndarray:
        alpha = [math.sqrt(float(alpha_bar[t])) for t in ts]
        sigma = [math.sqrt(1.0 - float(alpha_bar[t])) for t in ts]
        lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
        history: list[np.ndarray] = []        # x0 predictions, newest last
        for i, t in enumerate(ts):
            x0 = _x0(x, _eps(eps_fn, x, t), float(alpha_bar[t]))
            history = (history + [x0])[-3:]
            if i + 1 == len(ts):              # the last call lands on the clean latent
                x = x0
            else:
                j = i + 1
                k = min(order, len(history), len(ts) - 1 - i)    # warm-up and lower-order final steps
                h = lam[j] - lam[i]
                phi_1 = math.expm1(-h)                           # e^-h - 1
                d = -alpha[j] * phi_1 * history[-1]
                if k >= 2:
                    r0 = (lam[i] - lam[i - 1]) / h
                    d1_0 = (history[-1] - history[-2]) / r0
                    if k == 2:
                        d = d - 0.5 * alpha[j] * phi_1 * d1_0
                    else:
                        r1 = (lam[i - 1] - lam[i - 2]) / h
                        d1_1 = (history[-2] - history[-3]) / r1
                        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                        d2 = (d1_0 - d1_1) / (r0 + r1)
                        d = d + alpha[j] * (phi_1 / h + 1.0) * d1 - alpha[j] * ((phi_1 + h) / h ** 2 - 0.5) * d2
                x = _f32(sigma[j] / sigma[i] * x + d)
            if on_step is not None:
                on_step(i, x0)
        return x
    return run


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its update rule and a few words for `--help`."""
    run: SamplerFn
    about: str
    stochastic: bool = False


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(_generalised_ddim(0.0), "deterministic, first order"),
    "ddpm": Sampler(_generalised_ddim(1.0), "stochastic, first order", stochastic=True),
    "dpmpp-2m": Sampler(_dpm_solver_pp(2), "DPM-Solver++ 2M, deterministic"),
    "dpmpp-3m": Sampler(_dpm_solver_pp(3), "DPM-Solver++ 3M, deterministic"),
}
DEFAULT_SAMPLER = "ddim"


def names() -> str:
    """The registered names, for messages: 'ddim, ddpm, dpmpp-2m or dpmpp-3m'."""
    *rest, last = SAMPLERS
    return f"{', '.join(rest)} or {last}" if rest else last


def describe() -> str:
    """One line per sampler's name and nature, for `--help`."""
    return "; ".join(f"{name} ({s.about})" for name, s in SAMPLERS.items())


def sample(eps_fn: EpsFn, x: np.ndarray, alpha_bar: np.ndarray, steps: int, sampler: str,
           noise_fn: NoiseFn | None = None, on_step: StepFn | None = None) -> np.ndarray:
    """Denoise x (noise at t = T-1) in `steps` model calls with the registered `sampler`."""
    from .schedule import sampling_timesteps

    ts = sampling_timesteps(len(alpha_bar), steps)
    return SAMPLERS[sampler].run(eps_fn, x, alpha_bar, ts, noise_fn, on_step)

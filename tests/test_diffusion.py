"""Schedules and the torch samplers: with an oracle noise predictor they must land on x0."""

import numpy as np
import pytest
import torch

from rissole_edge.schedule import alphas_cumprod, sampling_timesteps
from rissole_export.diffusion import Diffusion


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules_decrease_from_one_to_noise(kind):
    a = alphas_cumprod(kind, 1000)
    assert a.shape == (1000,) and np.all(np.diff(a) < 0)
    assert 0.99 < a[0] < 1 and a[-1] < 0.01


def test_linear_schedule_matches_the_paper():
    betas = 1 - alphas_cumprod("linear", 1000) / np.concatenate([[1.0], alphas_cumprod("linear", 1000)[:-1]])
    assert np.allclose(betas[[0, -1]], [1e-4, 0.02])


@pytest.mark.parametrize("steps", [1, 2, 7, 50, 1000])
def test_sampling_timesteps_span_the_schedule(steps):
    ts = sampling_timesteps(1000, steps)
    assert len(ts) == steps and ts[0] == 999 and (steps == 1 or ts[-1] == 0)
    assert np.all(np.diff(ts) < 0)
    with pytest.raises(ValueError):
        sampling_timesteps(1000, 1001)


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddim", 50), ("ddpm", 100)])
def test_samplers_recover_x0_with_an_oracle(sampler, steps):
    diffusion = Diffusion("linear", 1000)
    torch.manual_seed(0)
    x0 = torch.randn(4, 3, 4, 4)

    def oracle(x, t):   # the exact noise that takes x0 to x at timestep t
        a = diffusion.alpha_bar[t.long()].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    g = torch.Generator().manual_seed(1)
    out = diffusion.sample(oracle, torch.randn(4, 3, 4, 4), steps, sampler,
                           lambda i: torch.randn(4, 3, 4, 4, generator=g))
    assert torch.allclose(out, x0, atol=1e-3)


def test_add_noise_uses_one_timestep_per_sample():
    diffusion = Diffusion("cosine", 1000)
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    out = diffusion.add_noise(x0, torch.tensor([0, 999]), noise)
    assert out[0].mean() > 0.99 and out[1].mean() < 0.1

"""Schedules and the torch samplers: with an oracle noise predictor they must land on x0."""

import numpy as np
import pytest
import torch

from rissole_edge import sampler as np_sampler
from rissole_edge.schedule import alphas_cumprod, sampling_timesteps
from rissole_export.diffusion import Diffusion

SAMPLERS = list(np_sampler.SAMPLERS)


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


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddim", 50), ("ddpm", 100), ("dpmpp-2m", 10),
                                           ("dpmpp-3m", 10), ("dpmpp-3m", 3)])
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


def _fake_eps(lib):
    """A deterministic noise predictor written for numpy and torch alike, so that the two
    samplers can be compared without a network: the optimal one for data ~ N(0, 0.25), plus a
    nonlinear error term so that multistep corrections have something to correct."""
    table = alphas_cumprod("linear", 1000).astype(np.float32)
    table = table if lib is np else torch.from_numpy(table)

    def eps(x, t):
        a = table[t.astype(np.int64) if lib is np else t.long()].reshape(-1, 1, 1, 1)
        return (1 - a) ** 0.5 * x / (0.25 * a + 1 - a) + 0.05 * lib.sin(3.0 * x)
    return eps


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 20])
def test_numpy_samplers_match_the_torch_reference(name, steps):
    """The runtime's numpy samplers and the independent torch reference, same fake model and
    same noise, for every registered sampler and step counts from 1 (high orders degrade)."""
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((5, 2, 3, 3)).astype(np.float32)
    noises = [rng.standard_normal(x.shape).astype(np.float32) for _ in range(steps)]
    ref = Diffusion("linear", 1000).sample(_fake_eps(torch), torch.from_numpy(x), steps, name,
                                           lambda i: torch.from_numpy(noises[i]))
    out = np_sampler.sample(_fake_eps(np), x, alphas_cumprod("linear", 1000), steps, name, lambda i: noises[i])
    assert out.dtype == np.float32 and out.shape == x.shape
    assert np.abs(out - ref.numpy()).max() < 1e-4, np.abs(out - ref.numpy()).max()


def test_high_order_samplers_are_ddim_at_two_steps_and_differ_beyond():
    """Two calls leave no history for a second-order step: every deterministic sampler is DDIM."""
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    a = alphas_cumprod("linear", 1000)
    run = {name: {s: np_sampler.sample(_fake_eps(np), x, a, s, name) for s in (1, 2, 6)}
           for name in ("ddim", "dpmpp-2m", "dpmpp-3m")}
    for name in ("dpmpp-2m", "dpmpp-3m"):
        assert np.allclose(run[name][1], run["ddim"][1], atol=1e-6)
        assert np.allclose(run[name][2], run["ddim"][2], atol=1e-5)
        assert not np.allclose(run[name][6], run["ddim"][6], atol=1e-3)
    assert not np.allclose(run["dpmpp-2m"][6], run["dpmpp-3m"][6], atol=1e-4)


def test_every_registered_sampler_reports_each_step_and_its_x0():
    seen = []
    x = np.ones((2, 1, 2, 2), np.float32)
    for name in SAMPLERS:
        seen.clear()
        np_sampler.sample(_fake_eps(np), x, alphas_cumprod("linear", 1000), 5, name,
                          lambda i: np.zeros_like(x), lambda i, x0: seen.append((i, x0.shape)))
        assert seen == [(i, x.shape) for i in range(5)], name


def test_the_torch_reference_refuses_an_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        Diffusion().sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), 2, "euler")

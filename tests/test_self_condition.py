"""Self-conditioning across blocks (denoiser.self_condition): a border-conditioned block's window
also carries the x0 estimate that the previous call made for its whole image, in training (from a
first call of the net itself, on half the images) and in sampling (from the previous step)."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rissole_edge.errors import UsageError
from rissole_export import config, denoiser, exporter, onnx_export, train
from rissole_export.diffusion import Diffusion
from rissole_export.sampling import generate_latents

B, C, S, W = 2, 4, 4, 2           # 2x2 blocks of 4x4 latent pixels, 4 channels, windows of 2


def _net() -> denoiser.UNet:
    torch.manual_seed(0)
    cfg = config.resolve("tiny", {"denoiser": {"border": W, "self_condition": True}}).denoiser
    net = denoiser.build(cfg, C, B * S)
    for p in net.parameters():      # the output conv and the window conv start at zero
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def test_self_conditioning_needs_the_window():
    with pytest.raises(config.ConfigError, match="self_condition needs denoiser.border"):
        config.resolve("tiny", {"denoiser": {"self_condition": True}})
    assert _net().border_in.in_channels == 2 * C


def test_the_estimate_is_the_x0_the_noise_prediction_implies_clamped():
    x, eps = torch.randn(3, C, S, S), torch.randn(3, C, S, S)
    a = torch.tensor([0.9, 0.5, 1e-4], dtype=torch.float64).view(-1, 1, 1, 1)
    got = denoiser.x0_estimate(x, eps, a)
    want = (x - (1 - a).sqrt() * eps) / a.sqrt()
    assert torch.allclose(got[:2], want[:2].float())
    assert got.abs().max() <= denoiser.ESTIMATE_LIMIT and (got[2].abs() == denoiser.ESTIMATE_LIMIT).any()


def test_training_windows_carry_the_net_s_own_estimate_on_the_chosen_images():
    net, diffusion = _net(), Diffusion()
    images = torch.randn(3 + net.k, B * B, C, S, S)
    nb = torch.stack([torch.arange(3, 3 + net.k).roll(i) for i in range(3)])
    keep = torch.tensor([1.0, 0.0, 1.0])
    cond = train.image_cond(images, nb, keep)
    assert torch.equal(cond[0, 3], images[nb[0], 3].reshape(-1, S, S)) and not cond[1].any()
    images = images[:3]
    use = torch.tensor([True, False, True])
    pos, t = torch.tensor([0, 1, 3]), torch.tensor([50, 400, 900])
    x_t, _, window = train.noisy_batch(diffusion, images, pos, t, torch.Generator().manual_seed(3), W, B,
                                       train.self_estimates(net, diffusion, cond, use, B))
    whole = diffusion.add_noise(images, t, torch.randn(images.shape, generator=torch.Generator().manual_seed(3)))
    rows = torch.arange(3)
    assert torch.equal(window[:, :C], denoiser.windows(whole, B, W)[rows, pos])
    assert not window[1, C:].any()                                  # not chosen: zeros, as at a first call
    first = denoiser.windows(torch.cat([whole, torch.zeros_like(whole)], 2), B, W)
    eps = net(whole[0], t[:1].repeat(B * B).float(), torch.arange(B * B), cond[0], first[0])
    own = denoiser.x0_estimate(whole[0], eps, diffusion.alpha_bar[50])
    assert torch.allclose(window[0, C:], denoiser.windows(own[None], B, W)[0, 0], atol=1e-6)


def test_sampling_feeds_each_call_the_previous_call_s_estimate():
    net, diffusion = _net(), Diffusion()
    latents = torch.randn(6, B * B, C, S, S, generator=torch.Generator().manual_seed(1))
    neighbours = np.array([[j for j in range(6) if j != i] for i in range(6)])
    calls = []
    generate_latents(net, latents, neighbours, diffusion, [0, 4], seed=7, steps=3, on_call=calls.append)
    assert len(calls) == 3 and not calls[0]["window"][:, C:].any()
    for before, after in zip(calls, calls[1:]):
        feeds = {k: torch.from_numpy(v) for k, v in before.items()}
        with torch.no_grad():
            eps = net(feeds["x"], feeds["t"], feeds["pos"], feeds["cond"], feeds["window"])
        est = denoiser.x0_estimate(feeds["x"], eps, diffusion.alpha_bar[int(before["t"][0])])
        x = torch.from_numpy(after["x"])
        seen = torch.cat([x, est], 1).reshape(2, B * B, 2 * C, S, S)
        np.testing.assert_allclose(after["window"], denoiser.windows(seen, B, W).flatten(0, 1).numpy(), atol=1e-6)


def test_export_refuses_a_self_conditioned_run(tmp_path):
    cfg = config.resolve("tiny", {"denoiser": {"border": W, "self_condition": True}})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(UsageError, match="denoiser.self_condition, a toolchain ablation"):
        exporter._check_inputs(tmp_path, tmp_path / "out.rissole", "int8", "x86", 32, 2.0)


def test_the_denoiser_graph_takes_both_windows():
    """What `paper64.py cost` counts a self-conditioned row's generation cost from."""
    net = _net()
    sess = ort.InferenceSession(onnx_export.denoiser(net), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[-1].name == "window" and sess.get_inputs()[-1].shape[1] == 2 * C
    g = torch.Generator().manual_seed(2)
    feeds = {"x": torch.randn(2, C, S, S, generator=g), "t": torch.tensor([5.0, 700.0]), "pos": torch.tensor([0, 3]),
             "cond": torch.randn(2, net.k * C, S, S, generator=g),
             "window": torch.randn(2, 2 * C, S + 2 * W, S + 2 * W, generator=g)}
    got = sess.run(["eps"], {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(*feeds.values()).numpy(), atol=1e-5)

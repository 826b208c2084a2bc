"""Border-strip conditioning (denoiser.border): each block also sees the latent rows/columns of
its adjacent blocks that touch it, from its own image's x_t, in training and in sampling."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rissole_edge import blocks
from rissole_export import config, denoiser, onnx_export, train
from rissole_export.diffusion import Diffusion
from rissole_export.sampling import generate_latents

B, C, S, W = 2, 4, 4, 1           # 2x2 blocks of 4x4 latent pixels, 4 channels, strips of 1


def _net(border: int = W, wake: bool = True) -> denoiser.UNet:
    torch.manual_seed(0)
    net = denoiser.build(config.resolve("tiny", {"denoiser": {"border": border}}).denoiser, C, B * S)
    if wake:                        # the output conv and the window conv start at zero
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return net.eval()


@pytest.mark.parametrize("width", [1, 2])
def test_windows_hold_the_block_the_touching_strips_and_zeros_beyond_the_edge(width):
    x = torch.randn(3, B * B, C, S, S)
    w = denoiser.windows(x, B, width)
    assert w.shape == (3, B * B, C, S + 2 * width, S + 2 * width)
    inner = slice(width, width + S)
    for p in range(B * B):
        assert torch.equal(w[:, p, :, inner, inner], x[:, p])
    top_left = w[:, 0]
    assert not top_left[:, :, :width].any() and not top_left[:, :, :, :width].any()      # the image's edge
    assert torch.equal(top_left[:, :, inner, width + S:], x[:, 1, :, :, :width])         # right neighbour
    assert torch.equal(top_left[:, :, width + S:, inner], x[:, 2, :, :width])            # neighbour below
    assert torch.equal(top_left[:, :, width + S:, width + S:], x[:, 3, :, :width, :width])  # the corner
    bottom_right = w[:, 3]
    assert not bottom_right[:, :, width + S:].any() and not bottom_right[:, :, :, width + S:].any()
    assert torch.equal(bottom_right[:, :, :width, inner], x[:, 1, :, S - width:])        # neighbour above


def test_a_fresh_window_conv_leaves_the_network_unchanged_and_a_trained_one_uses_the_strips():
    plain = _net(border=0)
    bordered = _net(wake=False)
    missing, unexpected = bordered.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["border_in.bias", "border_in.weight"]
    x, t, pos = torch.randn(2, C, S, S), torch.tensor([10.0, 700.0]), torch.tensor([0, 3])
    cond = torch.randn(2, bordered.k * C, S, S)
    window = torch.randn(2, C, S + 2 * W, S + 2 * W)
    assert torch.equal(plain(x, t, pos, cond), bordered(x, t, pos, cond, window))
    woken = _net()
    assert not torch.allclose(woken(x, t, pos, cond, window), woken(x, t, pos, cond, window + 1))


def test_training_noises_the_whole_latent_at_one_timestep():
    images = torch.randn(5, B * B, C, S, S)
    pos, t = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([0, 100, 500, 900, 999])
    diffusion = Diffusion()
    x_t, noise, window = train.noisy_batch(diffusion, images, pos, t, torch.Generator().manual_seed(3), W, B)
    full_noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    whole_x_t = diffusion.add_noise(images, t, full_noise)
    rows = torch.arange(5)
    assert torch.equal(noise, full_noise[rows, pos]) and torch.equal(x_t, whole_x_t[rows, pos])
    assert torch.equal(window, denoiser.windows(whole_x_t, B, W)[rows, pos])
    plain = train.noisy_batch(diffusion, images, pos, t, torch.Generator().manual_seed(3), 0, B)
    assert plain[2] is None and plain[0].shape == x_t.shape


def _sample(net: denoiser.UNet, ids: list[int], on_call=None) -> np.ndarray:
    latents = torch.randn(6, B * B, C, S, S, generator=torch.Generator().manual_seed(1))
    neighbours = np.array([[j for j in range(6) if j != i] for i in range(6)])
    return generate_latents(net, latents, neighbours, Diffusion(), ids, seed=7, steps=4, guidance=2.0,
                            on_call=on_call)


def test_sampling_gathers_each_call_s_windows_from_the_current_x_t():
    calls = []
    _sample(_net(), [0, 4], calls.append)
    assert len(calls) == 4
    for feeds in calls:
        x = torch.from_numpy(feeds["x"]).reshape(2, B * B, C, S, S)
        assert np.array_equal(feeds["window"], denoiser.windows(x, B, W).flatten(0, 1).numpy())


def test_an_image_is_the_same_alone_or_in_a_batch():
    net = _net()
    batch = _sample(net, [2, 5, 1])
    alone = _sample(net, [2])
    np.testing.assert_allclose(alone[0], batch[0], atol=1e-5)
    assert not np.allclose(batch[0], batch[1])


def test_border_is_refused_for_the_whole_latent_model():
    with pytest.raises(config.ConfigError, match="denoiser.border"):
        config.resolve("tiny", {"denoiser": {"kind": "whole", "border": 1}})
    with pytest.raises(config.ConfigError, match="denoiser.border"):
        config.resolve("tiny", {"denoiser": {"border": -1}})


@pytest.mark.parametrize("width", [1, 2, 4])
def test_the_runtime_s_numpy_windows_equal_the_toolchain_s(width):
    x = torch.randn(3, 9, C, S, S)           # 3x3 blocks: a middle block has neighbours on all sides
    assert np.array_equal(blocks.windows(x.numpy(), 3, width), denoiser.windows(x, 3, width).numpy())


def test_the_exported_denoiser_takes_the_window_and_computes_the_net():
    net = _net()
    model = onnx_export.denoiser(net)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x", "t", "pos", "cond", "window"]
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(3, C, S, S, generator=g), torch.randn(3, net.k * C, S, S, generator=g)
    window = torch.randn(3, C, S + 2 * W, S + 2 * W, generator=g)
    t, pos = torch.tensor([5.0, 400.0, 990.0]), torch.tensor([0, 2, 3])
    got = sess.run(["eps"], {"x": x.numpy(), "t": t.numpy(), "pos": pos.numpy(), "cond": cond.numpy(),
                             "window": window.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x, t, pos, cond, window).numpy(), atol=1e-5)

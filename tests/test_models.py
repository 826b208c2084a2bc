"""Autoencoder and denoiser: shapes, parameter budgets, and losses that fall on the sample."""

import numpy as np
import pytest
import torch

from rissole_export import config, data, database, denoiser, pixels
from rissole_export.autoencoder import VQAutoencoder
from rissole_export.diffusion import Diffusion
from rissole_export.layers import count_parameters
from rissole_export.sampling import block_latents, load_autoencoder

from conftest import SAMPLE


def test_autoencoder_downsamples_by_four_and_reconstructs_shape():
    cfg = config.resolve("small").autoencoder
    ae = VQAutoencoder(3, cfg)
    out = ae(torch.randn(2, 3, 32, 32))
    assert out["recon"].shape == (2, 3, 32, 32)
    assert out["indices"].shape == (2, 8, 8) and ae.downsample == 4
    assert int(out["indices"].max()) < cfg.codebook_size


def test_codebook_initialises_from_encoder_outputs_and_restarts_dead_codes():
    ae = VQAutoencoder(1, config.resolve("tiny").autoencoder)
    z = torch.randn(4, ae.cfg.latent_channels, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert ae.codebook.restart(z, ae.codebook.nearest(z), g) == ae.cfg.codebook_size
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    assert all((flat == code).all(1).any() for code in ae.codebook.embedding)   # every code is an output
    always_zero = torch.zeros(4, 4, 4, dtype=torch.long)
    restarted = [ae.codebook.restart(z, always_zero, g) for _ in range(400)]
    assert sum(restarted) > 0 and ae.codebook.usage[0] > 0.5


def _sample_pixels() -> np.ndarray:
    return data.load(str(SAMPLE), config.DataConfig(size=16, channels=1)).train


@pytest.mark.slow
def test_autoencoder_loss_falls_on_the_sample():
    torch.manual_seed(0)
    x = pixels.to_tensor(_sample_pixels())
    ae = VQAutoencoder(1, config.resolve("tiny").autoencoder)
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        batch = x[torch.randint(len(x), (64,), generator=g)]
        out = ae(batch)
        loss = torch.nn.functional.mse_loss(out["recon"], batch) + out["codebook_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        ae.codebook.restart(out["z"].detach(), out["indices"], g)
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])


@pytest.mark.parametrize("kind,fusion", [("block", "add"), ("block", "concat"),
                                         ("block-noretrieval", "add"), ("whole", "add")])
def test_denoiser_kinds_shapes(kind, fusion):
    cfg = config.resolve("small", {"denoiser": {"kind": kind, "fusion": fusion}}).denoiser
    net = denoiser.build(cfg, latent_channels=4, latent_side=8)
    side, positions = denoiser.geometry(cfg, 8)
    assert (side, positions) == ((8, 1) if kind == "whole" else (4, 4))
    x = torch.randn(3, 4, side, side)
    cond = torch.randn(3, cfg.k * 4, side, side) if kind == "block" else None
    out = net(x, torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 1, 2]) % positions, cond)
    assert out.shape == x.shape


def test_denoiser_uses_position_and_neighbours():
    torch.manual_seed(0)
    net = denoiser.build(config.resolve("tiny").denoiser, 4, 8)
    for p in net.parameters():                      # the output conv starts at zero; wake it up
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10.0, 10.0])
    cond = torch.randn(2, 16, 4, 4)
    base = net(x, t, torch.tensor([0, 0]), cond)
    assert not torch.allclose(base, net(x, t, torch.tensor([1, 1]), cond))
    assert not torch.allclose(base, net(x, t, torch.tensor([0, 0]), cond + 1))


def test_small_preset_is_compact():
    counts = {}
    for kind in ("block", "block-noretrieval", "whole"):
        cfg = config.resolve("small", {"denoiser": {"kind": kind}})
        counts[kind] = count_parameters(denoiser.build(cfg.denoiser, 4, 8))
    assert 0.5e6 <= counts["block"] <= 2e6
    assert abs(counts["whole"] - counts["block"]) / counts["block"] < 0.05     # same family, same width


def test_denoiser_loss_falls_on_sample_blocks(tiny_run):
    """A fresh block denoiser, trained on the tiny run's encoded sample with its neighbours."""
    torch.manual_seed(0)
    cfg = config.load(tiny_run / "config.json")
    db = database.Database.load(tiny_run / "database")
    latents = block_latents(load_autoencoder(tiny_run, cfg), db, whole=False)    # (N, P, C, s, s)
    neighbours = torch.from_numpy(db.neighbours).long()
    net = denoiser.build(cfg.denoiser, db.meta["latent_channels"], db.meta["latent_side"])
    diffusion = Diffusion("linear", 1000)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    n, positions, c, s, _ = latents.shape
    losses = []
    for _ in range(250):
        idx, pos = torch.randint(n, (64,)), torch.randint(positions, (64,))
        x0 = latents[idx, pos]
        cond = latents[neighbours[idx, :net.k], pos[:, None]].reshape(64, -1, s, s)
        t = torch.randint(1000, (64,))
        noise = torch.randn_like(x0)
        loss = denoiser.epsilon_loss(net, diffusion.add_noise(x0, t, noise), t.float(), pos, cond, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-30:]) < 0.75 * np.mean(losses[:30])

"""The border-consistency loss (denoiser.seam_loss): adjacent blocks of one image should err
alike on the latent rows/columns that meet at their shared edge, so the predicted image has the
true step across the seam."""

import numpy as np
import pytest
import torch

from rissole_export import config, denoiser, train
from rissole_export.diffusion import Diffusion

B, C, S = 2, 4, 4                 # 2x2 blocks of 4x4 latent pixels, 4 channels


def test_adjacent_pairs_are_the_touching_blocks_left_or_upper_first():
    pairs, vertical = train.adjacent_pairs(3)
    assert len(pairs) == 12 and int(vertical.sum()) == 6
    for (a, b), v in zip(pairs.tolist(), vertical.tolist()):
        assert (b - a == 3) if v else (b - a == 1 and a % 3 != 2)


def test_seam_loss_is_zero_when_the_sides_err_alike_at_the_shared_edge_and_positive_otherwise():
    first, second = torch.randn(2, C, S, S), torch.randn(2, C, S, S)
    vertical = torch.tensor([False, True])
    second[0, :, :, 0] = first[0, :, :, -1]          # left/right: last column meets first column
    second[1, :, 0, :] = first[1, :, -1, :]          # stacked: last row meets first row
    assert denoiser.seam_loss(first, second, vertical).item() == 0.0
    assert denoiser.seam_loss(first, second, ~vertical).item() > 0      # the other edges do not agree
    moved = second.clone()
    moved[0, 0, 2, 0] += 1.0
    assert denoiser.seam_loss(first, moved, vertical).item() == pytest.approx(1.0 / (2 * C * S))
    inner = second.clone()
    inner[:, :, 1:-1, 1:-1] += 5.0                   # away from the shared edge: not the loss's business
    assert denoiser.seam_loss(first, inner, vertical).item() == 0.0


def test_both_blocks_of_a_pair_come_from_one_noisy_latent():
    images = torch.randn(3, B * B, C, S, S)
    pos, t = torch.tensor([[0, 1], [1, 3], [2, 3]]), torch.tensor([5, 400, 999])
    diffusion = Diffusion()
    for border in (0, 1):
        x_t, noise, window = train.noisy_batch(diffusion, images, pos, t, torch.Generator().manual_seed(2), border, B)
        assert x_t.shape == (6, C, S, S) and noise.shape == x_t.shape
        x0 = images[torch.arange(3)[:, None], pos].flatten(0, 1)
        np.testing.assert_allclose(x_t, diffusion.add_noise(x0, t.repeat_interleave(2), noise), atol=1e-6)
        assert (window is None) == (border == 0)


def test_a_whole_image_batch_takes_every_adjacent_pair_of_every_image():
    """With cross_block the batch holds whole images: the seam term is the mean over each
    image's every adjacent pair (each weighing the same), as a loop over them computes it."""
    pairs, vertical = train.adjacent_pairs(B)
    error = torch.randn(3 * B * B, C, S, S, generator=torch.Generator().manual_seed(4))
    want = torch.stack([denoiser.seam_loss(error[i * B * B + a][None], error[i * B * B + b][None], v[None])
                        for i in range(3) for (a, b), v in zip(pairs.tolist(), vertical)]).mean()
    assert torch.allclose(train.seam_term(error, B * B, None, pairs, vertical), want)
    pick = torch.tensor([0, 3, 2])                  # pairs: one drawn pair per image, rows in pair order
    rows = torch.randn(6, C, S, S)
    assert torch.equal(train.seam_term(rows, 2, pick, pairs, vertical),
                       denoiser.seam_loss(rows[0::2], rows[1::2], vertical[pick]))


def _fit(run, seam_loss: float, cross_block: bool = False) -> dict[str, torch.Tensor]:
    cfg = config.resolve("tiny", {"denoiser": {"border": 1, "seam_loss": seam_loss, "steps": 3, "batch_size": 8,
                                               "cross_block": cross_block}})
    torch.manual_seed(0)
    net = denoiser.build(cfg.denoiser, C, B * S)
    for p in net.parameters():                      # the output conv starts at zero: no gradient to the rest
        torch.nn.init.normal_(p, std=0.05)
    latents = torch.randn(6, B * B, C, S, S, generator=torch.Generator().manual_seed(1))
    neighbours = np.array([[j for j in range(6) if j != i] for i in range(6)])
    run.mkdir()
    train.fit_denoiser(train.Context(run, cfg, None, progress=False), net, latents, neighbours)
    return net.state_dict()


@pytest.mark.parametrize("cross_block", [False, True])
def test_the_loss_is_off_by_default_and_changes_training_when_on(tmp_path, cross_block):
    assert config.resolve("tiny").denoiser.seam_loss == 0.0
    off, off_again, on = (_fit(tmp_path / name, w, cross_block)
                          for name, w in (("off", 0.0), ("again", 0.0), ("on", 0.5)))
    assert all(torch.equal(off[k], off_again[k]) for k in off)
    assert any(not torch.equal(off[k], on[k]) for k in off)


def test_seam_loss_is_refused_without_adjacent_blocks():
    with pytest.raises(config.ConfigError, match="denoiser.seam_loss"):
        config.resolve("tiny", {"denoiser": {"kind": "whole", "seam_loss": 0.1}})
    with pytest.raises(config.ConfigError, match="denoiser.seam_loss"):
        config.resolve("tiny", {"denoiser": {"seam_loss": -0.1}})

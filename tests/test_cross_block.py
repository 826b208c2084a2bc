"""Attention across the blocks of an image (denoiser.cross_block): the blocks of one image
compute together at the bottleneck, so a block's prediction depends on its image's other
blocks; images stay independent of each other, in training batches and in sampling."""

import json

import numpy as np
import pytest
import torch

from rissole_edge.errors import UsageError
from rissole_export import config, denoiser, exporter, train
from rissole_export.diffusion import Diffusion
from rissole_export.sampling import generate_latents

B, C, S = 2, 4, 4                 # 2x2 blocks of 4x4 latent pixels, 4 channels
P = B * B


def _net(cross: bool = True, wake: bool = True) -> denoiser.UNet:
    torch.manual_seed(0)
    cfg = config.resolve("tiny", {"denoiser": {"cross_block": cross, "batch_size": 8}}).denoiser
    net = denoiser.build(cfg, C, B * S)
    if wake:                        # the output conv and the mixer's projection start at zero
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def _inputs(images: int, k: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(images * P, C, S, S, generator=g)
    t = torch.tensor([300.0] * P + [800.0] * P)[: images * P]
    pos = torch.arange(P).repeat(images)
    return x, t, pos, torch.randn(images * P, k * C, S, S, generator=g)


def test_a_fresh_mixer_is_the_identity():
    plain, mixed = _net(cross=False), _net(wake=False)
    missing, unexpected = mixed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("mixer.") for name in missing)
    x, t, pos, cond = _inputs(2, plain.k)
    assert torch.allclose(plain(x, t, pos, cond), mixed(x, t, pos, cond), atol=1e-6)


@pytest.mark.parametrize("cross", [True, False])
def test_a_block_sees_its_own_image_s_other_blocks_and_no_other_image(cross):
    net = _net(cross)
    x, t, pos, cond = _inputs(2, net.k)
    before = net(x, t, pos, cond)
    x2 = x.clone()
    x2[1] += 1.0                    # image 0, block 1
    after = net(x2, t, pos, cond)
    assert torch.equal(after[P:], before[P:])                       # image 1 never sees image 0
    assert torch.equal(after[2:P], before[2:P]) != cross            # image 0's blocks 2, 3 do, with the mixer


def test_sampling_gives_an_image_alone_or_in_a_batch_alike():
    net = _net()
    latents = torch.randn(6, P, C, S, S, generator=torch.Generator().manual_seed(1))
    neighbours = np.array([[j for j in range(6) if j != i] for i in range(6)])

    def sample(ids: list[int]) -> np.ndarray:
        return generate_latents(net, latents, neighbours, Diffusion(), ids, seed=7, steps=3, guidance=2.0)
    np.testing.assert_allclose(sample([2]), sample([2, 5, 1])[:1], atol=1e-5)


def test_cross_block_is_refused_where_a_batch_cannot_hold_whole_images():
    for bad in ({"seam_loss": 0.25}, {"batch_size": 6}, {"kind": "whole"}, {"blocks_per_side": 1}):
        with pytest.raises(config.ConfigError, match="cross_block"):
            config.resolve("tiny", {"denoiser": {"cross_block": True, "batch_size": 8, **bad}})


def test_export_refuses_a_cross_block_run(tmp_path):
    cfg = config.resolve("tiny", {"denoiser": {"cross_block": True, "batch_size": 8}})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(UsageError, match="denoiser.cross_block, a toolchain ablation"):
        exporter._check_inputs(tmp_path, tmp_path / "out.rissole", "int8", "x86", 32, 2.0)


@pytest.mark.parametrize("switches,group", [({"cross_block": True}, P), ({"seam_loss": 0.25}, 2), ({}, 1)])
def test_the_rows_of_one_image_share_its_neighbours_and_dropout_as_at_sampling(switches, group):
    """A training batch holds whole images (cross_block) or adjacent pairs (seam loss); their rows
    must be conditioned on one draw of k neighbours, kept or dropped together."""
    cfg = config.resolve("tiny", {"denoiser": {"batch_size": 48, "cond_drop": 0.5, **switches}}).denoiser
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(30, P, C, S, S, generator=g)
    neighbours = torch.stack([torch.randperm(30, generator=g)[:8] for _ in range(30)])
    pairs, _ = train.adjacent_pairs(B)
    idx, pos, got, pick, nb, cond, keep = train.draw_batch(cfg, 2, latents, neighbours, pairs, 48, g)
    assert got == group and len(idx) == 48
    rows = lambda v: v.reshape(48 // group, group, *v.shape[1:])    # noqa: E731  (one image per row)
    for v in (idx, nb, keep):
        assert torch.equal(rows(v), rows(v)[:, :1].expand_as(rows(v)))
    if group == P:
        assert torch.equal(rows(pos), torch.arange(P).expand(48 // P, P))
    assert 0 < keep.mean() < 1 and len(set(keep[::group].tolist())) == 2        # some images kept, some dropped
    assert all(set(nb[r].tolist()) <= set(neighbours[idx[r]].tolist()) for r in range(48))
    expected = latents[nb, pos[:, None]].reshape(48, -1, S, S) * keep[:, None, None, None]
    assert torch.equal(cond, expected)
    if group == 1:      # independent rows: not every image's rows agree by chance
        assert len({tuple(r.tolist()) for r in nb}) > 1

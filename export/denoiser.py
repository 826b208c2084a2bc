"""The retrieval-guided block denoiser and its two baselines, one UNet family.

- "block": denoises one latent block given the timestep, the block position and the
  same-position blocks of k neighbours (the method);
- "block-noretrieval": the same without neighbours (the paper's ablation: incoherent blocks);
- "whole": a plain latent diffusion UNet on the whole latent (no blocks, no retrieval).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rissole_edge.schedule import alphas_cumprod

from .config import DenoiserConfig
from .layers import BlockMixer, Downsample, ResBlock, Upsample, norm, sinusoidal


class UNet(nn.Module):
    """A compact DDPM-style UNet predicting the noise (epsilon) of a latent block.

    Inputs: x (N, C, s, s) noisy block; t (N,) float timesteps; pos (N,) int64 block
    positions; cond (N, k*C, s, s) the neighbours' blocks at the same position, stacked along
    channels in rank order (zeros mean "no neighbours": classifier-free guidance); with
    `border` w > 0, window (N, C, s+2w, s+2w): the block's window of its own image's x_t
    (`windows`), so that the block sees the w latent rows/columns of the adjacent blocks that
    touch it. A (2w+1)-square convolution without padding maps the window onto the block's
    s x s grid, added to the input features like `cond`; it starts at zero, so a trained net
    given the switch starts out computing what it did without it. With `self_condition` the
    window has 2C channels: x_t's window, then the same window of the x0 estimate that the
    previous call made for the whole image (`x0_estimate`; zeros at the first call): a block
    then sees what its neighbours are becoming, not only their noisy state (self-conditioning,
    Chen et al. 2022, "Analog Bits", here across blocks).
    With `cross_block` a `BlockMixer` between the two middle blocks lets the blocks of an image
    attend to each other's bottleneck features; the batch then holds whole images, image-major.

    With `v_schedule` (alpha_bar per timestep) the network predicts v = a eps - s x0 and the
    module returns eps = s x + a v: the output is still epsilon, so the runtime samples it like
    any denoiser, but an error in the network's output no longer blows up in x0 at low
    signal-to-noise (the few-step students of distill.py need that).
    """

    def __init__(self, latent_channels: int, block_size: int, k: int, positions: int,
                 channels: int, channel_mult: tuple[int, ...], res_blocks: int, fusion: str,
                 v_schedule: torch.Tensor | None = None, border: int = 0, self_condition: bool = False,
                 cross_block: bool = False):
        super().__init__()
        if block_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"a block of side {block_size} cannot be halved "
                             f"{len(channel_mult) - 1} times: use fewer channel_mult levels")
        self.latent_channels, self.block_size, self.k = latent_channels, block_size, k
        self.positions, self.fusion, self.channels = positions, fusion, channels
        emb = channels * 2
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.pos_emb = nn.Embedding(positions, emb) if positions > 1 else None
        cond_channels = k * latent_channels
        concat = fusion == "concat" and k > 0
        self.conv_in = nn.Conv2d(latent_channels + (cond_channels if concat else 0), channels, 3, padding=1)
        # Additive fusion (the paper): the neighbours get their own conv, added to the input features.
        self.cond_in = nn.Conv2d(cond_channels, channels, 3, padding=1) if k and not concat else None
        self.border, self.self_condition = border, self_condition
        window_channels = latent_channels * (2 if self_condition else 1)
        self.border_in = nn.Conv2d(window_channels, channels, 2 * border + 1) if border else None
        if self.border_in is not None:
            nn.init.zeros_(self.border_in.weight)
            nn.init.zeros_(self.border_in.bias)

        widths = [channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        skips, cin = [channels], channels
        for i, width in enumerate(widths):
            for _ in range(res_blocks):
                self.down.append(ResBlock(cin, width, emb))
                cin = width
                skips.append(cin)
            if i < len(widths) - 1:
                self.down.append(Downsample(cin))
                skips.append(cin)
        self.mid = nn.ModuleList([ResBlock(cin, cin, emb), ResBlock(cin, cin, emb)])
        bottom = block_size // 2 ** (len(channel_mult) - 1)
        self.mixer = BlockMixer(cin, positions, bottom) if cross_block else None
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            for _ in range(res_blocks + 1):
                self.up.append(ResBlock(cin + skips.pop(), width, emb))
                cin = width
            if i > 0:
                self.up.append(Upsample(cin))
        self.out = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, latent_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.v_prediction = v_schedule is not None
        if v_schedule is not None:     # not in the state dict: it is the config's schedule
            self.register_buffer("alpha_bar", v_schedule.float(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, pos: torch.Tensor,
                cond: torch.Tensor | None = None, window: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(sinusoidal(t, self.channels))
        if self.pos_emb is not None:
            emb = emb + self.pos_emb(pos)
        if self.k and self.cond_in is None:
            h = self.conv_in(torch.cat([x, cond], dim=1))
        else:
            h = self.conv_in(x)
            if self.cond_in is not None:
                h = h + self.cond_in(cond)
        if self.border_in is not None:
            h = h + self.border_in(window)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid[0](h, emb)
        if self.mixer is not None:
            h = self.mixer(h)
        h = self.mid[1](h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        if not self.v_prediction:
            return self.out(h)
        a = self.alpha_bar[t.long().clamp(0, len(self.alpha_bar) - 1)].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x + a.sqrt() * self.out(h)


def windows(blocks: torch.Tensor, blocks_per_side: int, width: int) -> torch.Tensor:
    """(n, P, C, s, s) blocks of n images -> (n, P, C, s+2w, s+2w): each block's window of its
    image (the block and the w rows/columns of every adjacent block that touch it, the corners
    included), zeros beyond the image's edge. The runtime's numpy twin is
    `rissole_edge.blocks.windows`; a test holds them equal."""
    n, p, c, s, _ = blocks.shape
    b, side = blocks_per_side, s + 2 * width
    whole = blocks.reshape(n, b, b, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(n, c, b * s, b * s)
    tiles = F.pad(whole, (width,) * 4).unfold(2, side, s).unfold(3, side, s)     # (n, C, b, b, side, side)
    return tiles.permute(0, 2, 3, 1, 4, 5).reshape(n, p, c, side, side)


ESTIMATE_LIMIT = 5.0      # latents are scaled to unit variance; beyond this an x0 estimate is noise


def x0_estimate(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The x0 a noise prediction implies, clamped: at high noise (x_t - sqrt(1-a) eps) / sqrt(a)
    multiplies eps's error by up to 1/sqrt(a) (150x at t = 999), and a self-conditioned block
    should see a bounded guess there, the same in training and sampling."""
    a = alpha_bar.float()
    return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-ESTIMATE_LIMIT, ESTIMATE_LIMIT)


def geometry(cfg: DenoiserConfig, latent_side: int) -> tuple[int, int]:
    """(block side, number of block positions) for a latent of side `latent_side`."""
    blocks = 1 if cfg.kind == "whole" else cfg.blocks_per_side
    if latent_side % blocks:
        raise ValueError(f"a latent of side {latent_side} cannot be cut into {blocks}x{blocks} blocks")
    return latent_side // blocks, blocks * blocks


def build(cfg: DenoiserConfig, latent_channels: int, latent_side: int) -> UNet:
    """The denoiser a config asks for."""
    block_size, positions = geometry(cfg, latent_side)
    k = cfg.k if cfg.kind == "block" else 0
    v_schedule = torch.from_numpy(alphas_cumprod(cfg.schedule, cfg.timesteps)) if cfg.prediction == "v" else None
    return UNet(latent_channels, block_size, k, positions, cfg.channels, cfg.channel_mult,
                cfg.res_blocks, cfg.fusion, v_schedule, cfg.border, cfg.self_condition, cfg.cross_block)


def epsilon_loss(model: nn.Module, x_noisy: torch.Tensor, t: torch.Tensor, pos: torch.Tensor,
                 cond: torch.Tensor | None, noise: torch.Tensor,
                 window: torch.Tensor | None = None) -> torch.Tensor:
    return F.mse_loss(model(x_noisy, t, pos, cond, window), noise)


def seam_loss(first: torch.Tensor, second: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """Border consistency of adjacent blocks of one image: `first`/`second` (N, C, s, s) are the
    epsilon errors (prediction - noise) of the left/upper and right/lower block of each pair,
    `vertical` (N,) bool says the pair is stacked. Their x0 errors are -sqrt((1-a)/a) times these,
    so the mean squared difference of the errors on the two latent rows (columns) that meet at
    the shared edge is the SNR-weighted squared error of the predicted step across the seam: 0
    when both sides err alike (no visible seam), in the denoising loss's own units."""
    v = vertical[:, None, None]
    return F.mse_loss(torch.where(v, first[..., -1, :], first[..., :, -1]),
                      torch.where(v, second[..., 0, :], second[..., :, 0]))

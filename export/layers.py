"""Building blocks shared by the autoencoder and the denoisers (one definition of each)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with as many groups (up to 8) as divide the width: works for any width."""
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block; with `emb_dim` > 0 a conditioning vector (timestep and
    block position) is added between the two convolutions, as in the DDPM UNet."""

    def __init__(self, cin: int, cout: int, emb_dim: int = 0):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout) if emb_dim else None
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a conv: no ConvTranspose, which int8 runtimes keep
    in fp32 and which makes checkerboard artefacts."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of (float) timesteps, shape (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class BlockMixer(nn.Module):
    """Self-attention over the bottleneck features of all `positions` blocks of each image:
    the one place where blocks compute together rather than only seeing each other's inputs.
    The batch must hold every block of its images, image-major (as sampling and a cross_block
    training batch do). Tokens get a learned embedding of where they sit in the image; the
    output projection starts at zero, so the mixer starts as the identity."""

    def __init__(self, channels: int, positions: int, side: int, heads: int = 4):
        super().__init__()
        self.positions = positions
        self.norm = norm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.where = nn.Parameter(torch.zeros(positions * side * side, channels))
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        p = self.positions
        tokens = self.norm(h).reshape(n // p, p, c, hh * ww).permute(0, 1, 3, 2).reshape(n // p, p * hh * ww, c)
        tokens = tokens + self.where
        return h + self._attend(tokens).reshape(n // p, p, hh * ww, c).permute(0, 1, 3, 2).reshape(n, c, hh, ww)

    def _attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """What `self.attn(tokens, tokens, tokens)` computes, written out with its weights: under
        no_grad nn.MultiheadAttention takes a fused kernel that the ONNX exporter cannot export."""
        a = self.attn
        b, t, c = tokens.shape
        heads = a.num_heads
        q, k, v = F.linear(tokens, a.in_proj_weight, a.in_proj_bias).reshape(b, t, 3, heads, c // heads) \
            .permute(2, 0, 3, 1, 4)                                              # 3 x (b, heads, t, d)
        weights = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(b, t, c)
        return a.out_proj(mixed)

"""A small VQ autoencoder (VQGAN-style, without the perceptual loss: no VGG weights offline).

The encoder downsamples by 2 per extra level of `channel_mult` (x4 by default); the latent is
snapped to the nearest of `codebook_size` codes. The neighbour database stores code indices,
so the codebook is what makes it compact.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import AutoencoderConfig
from .layers import Downsample, ResBlock, Upsample, norm


class Encoder(nn.Module):
    def __init__(self, image_channels: int, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(image_channels, widths[0], 3, padding=1)]
        for i, width in enumerate(widths):
            layers.append(ResBlock(widths[max(i - 1, 0)], width))
            if i < len(widths) - 1:
                layers.append(Downsample(width))
        layers += [ResBlock(widths[-1], widths[-1]), norm(widths[-1]), nn.SiLU(),
                   nn.Conv2d(widths[-1], cfg.latent_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, image_channels: int, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.channel_mult)]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1),
                                   ResBlock(widths[0], widths[0])]
        for i, width in enumerate(widths):
            layers.append(ResBlock(widths[max(i - 1, 0)], width))
            if i < len(widths) - 1:
                layers.append(Upsample(width))
        layers += [norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], image_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Codebook(nn.Module):
    """Nearest-code quantizer with a straight-through gradient.

    Codes are initialised from encoder outputs and dead codes are restarted on them, which
    keeps the whole codebook in use (both shipped models use 100% of their codes: models/*.md)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(size, dim) * 0.1)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("usage", torch.ones(size))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code index per latent pixel: (N, D, h, w) -> (N, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embedding.t()
             + self.embedding.pow(2).sum(1)[None, :])
        return d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices: (N, h, w) -> (N, D, h, w)."""
        return self.embedding[indices].permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.nearest(z)
        return self.lookup(indices), indices

    @torch.no_grad()
    def restart(self, z: torch.Tensor, indices: torch.Tensor, generator: torch.Generator) -> int:
        """Track code usage; move codes unused for a while onto random encoder outputs.
        Returns how many codes were restarted."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if not bool(self.initialised):
            pick = torch.randint(len(flat), (len(self.embedding),), generator=generator)
            self.embedding.data.copy_(flat[pick.to(flat.device)])
            self.initialised.fill_(True)
            return len(self.embedding)
        counts = torch.bincount(indices.flatten(), minlength=len(self.embedding)).float()
        self.usage.mul_(0.99).add_(counts / counts.sum() * len(self.embedding), alpha=0.01)
        dead = self.usage < 0.03
        n = int(dead.sum())
        if n:
            pick = torch.randint(len(flat), (n,), generator=generator)
            self.embedding.data[dead] = flat[pick.to(flat.device)]
            self.usage[dead] = 1.0
        return n


class VQAutoencoder(nn.Module):
    """Pixels in [-1, 1] -> code indices -> pixels."""

    def __init__(self, image_channels: int, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(image_channels, cfg)
        self.codebook = Codebook(cfg.codebook_size, cfg.latent_channels)
        self.decoder = Decoder(image_channels, cfg)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.channel_mult) - 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x)
        zq, indices = self.codebook(z)
        codebook_loss = F.mse_loss(zq, z.detach()) + self.cfg.commitment * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()       # straight-through estimator
        return {"recon": self.decoder(zq), "z": z, "indices": indices, "codebook_loss": codebook_loss}

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.codebook.nearest(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the exported encoder computes: (latent snapped to codes, unscaled; code indices)."""
        return self.codebook(self.encoder(x))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a continuous latent (e.g. from the denoiser) after snapping it to the codebook."""
        return self.decoder(self.codebook.lookup(self.codebook.nearest(z)))


class PatchDiscriminator(nn.Module):
    """PatchGAN critic (optional): pushes the decoder towards sharp textures."""

    def __init__(self, image_channels: int, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(image_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels * 2, 4, 2, 1), norm(channels * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(channels * 2, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

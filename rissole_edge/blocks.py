"""Cutting a latent grid into B x B blocks in raster order, and putting it back together.

Block position p = row * B + col. Shared by the toolchain (database, training) and the
runtime (assembling generated blocks), so both agree on what "position p" means.
"""

from __future__ import annotations

import numpy as np


def split(latent: np.ndarray, blocks_per_side: int) -> np.ndarray:
    """(N, C, H, W) -> (N, B*B, C, H/B, W/B)."""
    n, c, h, w = latent.shape
    b = blocks_per_side
    if h % b or w % b:
        raise ValueError(f"a {h}x{w} latent cannot be cut into {b}x{b} blocks")
    x = latent.reshape(n, c, b, h // b, b, w // b)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, b * b, c, h // b, w // b)


def join(blocks: np.ndarray, blocks_per_side: int) -> np.ndarray:
    """(N, B*B, C, s, s) -> (N, C, B*s, B*s); the inverse of `split`."""
    n, p, c, s, t = blocks.shape
    b = blocks_per_side
    if p != b * b:
        raise ValueError(f"{p} blocks do not make a {b}x{b} grid")
    x = blocks.reshape(n, b, b, c, s, t).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, b * s, b * t)


def windows(blocks: np.ndarray, blocks_per_side: int, width: int) -> np.ndarray:
    """(n, P, C, s, s) blocks of n images -> (n, P, C, s+2w, s+2w): each block's window of its
    own image (the block and the w rows/columns of every adjacent block that touch it, corners
    included), zeros beyond the image's edge. What a border-conditioned denoiser (manifest
    `denoiser.border` = w) takes as `window`; the numpy twin of the toolchain's
    `denoiser.windows`, which a test holds equal."""
    n, p, c, s, _ = blocks.shape
    side = s + 2 * width
    padded = np.pad(join(blocks, blocks_per_side), ((0, 0), (0, 0), (width, width), (width, width)))
    out = np.empty((n, p, c, side, side), blocks.dtype)
    for pos in range(p):
        row, col = divmod(pos, blocks_per_side)
        out[:, pos] = padded[:, :, row * s:row * s + side, col * s:col * s + side]
    return out


def row_windows(rows: np.ndarray, blocks_per_side: int, width: int) -> np.ndarray:
    """`windows` for denoiser rows: (n*P, C, s, s) rows of whole images, P blocks each in
    position order -> (n*P, C, s+2w, s+2w), each row's window of its own image. The runtime's
    calls and a distillation teacher's both hold rows this way."""
    _, c, s, _ = rows.shape
    whole = windows(rows.reshape(-1, blocks_per_side ** 2, c, s, s), blocks_per_side, width)
    return whole.reshape(len(rows), c, s + 2 * width, s + 2 * width)

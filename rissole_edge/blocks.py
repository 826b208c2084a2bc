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

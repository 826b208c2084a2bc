"""torch mirrors of the runtime's pixel conversions (`rissole_edge.images.from_uint8` and
`to_uint8`): the toolchain goes through them, so training, the database, the reference sampler
and evaluation see pixels exactly as the runtime converts them."""

from __future__ import annotations

import numpy as np
import torch

from rissole_edge.images import from_uint8, to_uint8


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(from_uint8(pixels))


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Decoder output (N, C, H, W) in [-1, 1], on any device -> uint8 (N, H, W, C)."""
    return to_uint8(x.detach().float().cpu().numpy())

"""Previews while sampling: the decoded x0 prediction of every image, every K steps.

A sampler knows, after each step, what clean latent the model currently predicts; decoding
that shows where an image is heading long before it is finished (the feature users of
diffusion tools ask for beside a progress bar). One `Preview` spans one `generate` call: it
keeps the latest prediction of every block of the call's images, so that a preview is always
the whole batch. Blocks that no denoiser chunk has reached yet are zero latents.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import UsageError

PreviewFn = Callable[[int, np.ndarray], None]       # (steps done, uint8 images (n, H, W, C))


def default_every(steps: int) -> int:
    """About ten previews per run, and one at every step of a few-step run."""
    return max(1, steps // 10)


class Preview:
    def __init__(self, callback: PreviewFn, every: int, steps: int, first_index: int, latents_shape: tuple,
                 decode: Callable[[np.ndarray], np.ndarray]):
        self.callback, self.every, self.steps, self.first = callback, every, steps, first_index
        self.latents = np.zeros(latents_shape, np.float32)     # (n, P, C, s, s)
        self.decode = decode
        self._lock = threading.Lock()          # chunks may be denoised by parallel workers

    def update(self, images: np.ndarray, positions: np.ndarray, step: int, x0: np.ndarray) -> None:
        """Step `step` (0-based) of a chunk predicted `x0` for blocks (images[j], positions[j])."""
        done = step + 1
        if done % self.every and done != self.steps:
            return
        with self._lock:
            self.latents[images - self.first, positions] = x0
            self.callback(done, self.decode(self.latents))


def grid_file(path: Path) -> PreviewFn:
    """A preview callback that rewrites one grid PNG (atomically: a viewer that reloads it never
    sees half a file). The folder must exist and be writable, checked now, before any work."""
    from . import images

    path = Path(path)
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK) or path.is_dir():
        raise UsageError(f"cannot write the preview {path}: its folder must exist and be writable")

    def write(_step: int, pixels: np.ndarray) -> None:
        try:
            images.save_png(images.grid([images.to_pil(p) for p in pixels]), path)
        except OSError as e:
            raise UsageError(f"cannot write the preview {path}: {e.strerror or e}") from None
    return write

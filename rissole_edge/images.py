"""Turning decoder output into pictures and writing them without leaving partial files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


FITS = ("pad", "crop", "stretch")


def fit(im: Image.Image, size: int, channels: int, background: str, policy: str = "pad") -> np.ndarray:
    """The one preprocessing of training images and of `--like` queries, so that both land in
    the same latent space: composite transparency on `background`, convert to grey or RGB, then
    make the image a `size` square by `policy`:

    - "pad" (the default, as for training: data.fit): an image that fits inside the square is
      centred on its own edge colour (nothing is resampled); a larger one is cropped as below;
    - "crop": centre-crop to a square, resize to `size`;
    - "stretch": resize to the square, ignoring the aspect ratio.

    Returns uint8 (size, size, channels); raises ValueError (or TypeError) for a background
    that is not a colour."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba)
    im = im.convert("L" if channels == 1 else "RGB")
    if policy == "stretch":
        im = im.resize((size, size), Image.LANCZOS) if im.size != (size, size) else im
    elif policy == "pad" and im.width <= size and im.height <= size:
        colour = edge_colour(np.asarray(im).reshape(im.height, im.width, -1))
        canvas = Image.new(im.mode, (size, size), colour if channels == 3 else colour[0])
        canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
        im = canvas
    else:
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != size:
            im = im.resize((size, size), Image.LANCZOS)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def from_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> encoder input (N, C, H, W) in [-1, 1]: the inverse of to_uint8."""
    return pixels.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Decoder output (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def edge_colour(pixels: np.ndarray) -> tuple[int, ...]:
    """The median colour of the outermost pixels of uint8 (..., H, W, C) images: what the images
    themselves stand on (black for Fashion-MNIST, white for Twemoji), whatever a manifest says."""
    ring = np.concatenate([pixels[..., 0, :, :], pixels[..., -1, :, :], pixels[..., :, 0, :],
                           pixels[..., :, -1, :]], axis=-2).reshape(-1, pixels.shape[-1])
    return tuple(int(v) for v in np.median(ring, axis=0))


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile images row by row; the cells of an incomplete last row take the images' own edge
    colour, so that a grid of a black-background model is not padded with white."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    colour = edge_colour(np.stack([np.asarray(im).reshape(h, w, -1) for im in images]))
    out = Image.new(images[0].mode, (columns * w, rows * h), colour if len(colour) > 1 else colour[0])
    for i, im in enumerate(images):
        out.paste(im, ((i % columns) * w, (i // columns) * h))
    return out


def save_png(image: Image.Image, path: Path) -> None:
    """Write atomically (a reader never sees a half-written PNG), with the permissions the
    umask gives a new file (mkstemp would force 0600): the temp file is created by os.open
    with mode 0666, which the kernel masks, then renamed over the target."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{os.urandom(6).hex()}-{path.name}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

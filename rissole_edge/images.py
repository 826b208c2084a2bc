"""Turning decoder output into pictures and writing them without leaving partial files.

Pillow is imported only where a picture is read, resized or tiled: `generate` writes its PNGs
with `png_bytes` (zlib), because Pillow and its PNG plugin are 3.4 MB of a default run's RSS
(benchmarks/results/memory.md).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
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
    from PIL import Image

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
    from PIL import Image

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
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    colour = edge_colour(np.stack([np.asarray(im).reshape(h, w, -1) for im in images]))
    out = Image.new(images[0].mode, (columns * w, rows * h), colour if len(colour) > 1 else colour[0])
    for i, im in enumerate(images):
        out.paste(im, ((i % columns) * w, (i // columns) * h))
    return out


def _filtered_rows(rows: np.ndarray, channels: int) -> np.ndarray:
    """PNG's adaptive filtering: each row as the one of its five filters (none, Sub, Up,
    Average, Paeth) whose bytes, read as signed, sum smallest in magnitude, behind its filter
    type byte (the PNG specification's recommended heuristic)."""
    x = rows.astype(np.int16)
    a, b, c = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)     # left, up, up-left
    a[:, channels:], b[1:], c[1:, channels:] = x[:, :-channels], x[:-1], x[:-1, :-channels]
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    candidates = np.stack([x, x - a, x - b, x - (a + b) // 2, x - paeth]).astype(np.uint8)  # modulo 256
    best = np.abs(candidates.view(np.int8).astype(np.int32)).sum(2).argmin(0)
    return np.concatenate([best[:, None].astype(np.uint8), candidates[best, np.arange(len(x))]], 1)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG of uint8 pixels (H, W) or (H, W, C), C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA:
    8 bits, no interlace."""
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = np.asarray(pixels, dtype=np.uint8).reshape(pixels.shape[0], -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 8, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    idat = zlib.compress(_filtered_rows(rows, channels).tobytes(), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def save_png(image: np.ndarray | Image.Image, path: Path) -> None:
    """Write uint8 pixels (H, W[, C]) or a grey/RGB picture as a PNG, atomically (a reader never
    sees a half-written PNG), with the permissions the umask gives a new file (mkstemp would
    force 0600): the temp file is created by os.open with mode 0666, which the kernel masks,
    then renamed over the target."""
    path = Path(path)
    data = png_bytes(np.asarray(image))
    tmp = path.with_name(f".tmp-{os.getpid()}-{os.urandom(6).hex()}-{path.name}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

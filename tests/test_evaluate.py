"""Evaluation: the numpy metrics on made-up data with known answers, then one real evaluate()
of the tiny bundle with the real EfficientNet-Lite0 feature extractor."""

import math

import numpy as np
import pytest
import torch

import rissole_export.evaluate as evaluation
from rissole_edge.bundle import Bundle
from rissole_edge.errors import UsageError
from rissole_export import config
from rissole_export import data as datasets
from rissole_export.evaluate import (block_agreement, cached_features, copy_margins, evaluate,
                                     frechet_distance, kid, nearest_distances, seam_ratio)
from rissole_export.sampling import RunModels
from rissole_export.sampling import generate as torch_generate

from conftest import SAMPLE, train_variant


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path, monkeypatch):
    """Keep the tests' reference features out of the user's cache (and out of each other's)."""
    monkeypatch.setenv("RISSOLE_EDGE_CACHE", str(tmp_path / "cache"))


def _smooth_images(n, side, seed, cutoff=4):
    """Stationary smooth random fields in [0, 1] (low-pass filtered white noise, periodic):
    no position is special, so block borders are no different from any other row."""
    rng = np.random.default_rng(seed)
    spectrum = np.fft.fft2(rng.standard_normal((n, side, side)))
    f = np.fft.fftfreq(side) * side
    keep = (np.abs(f)[:, None] <= cutoff) & (np.abs(f)[None, :] <= cutoff)
    x = np.fft.ifft2(spectrum * keep).real
    x = (x - x.mean()) / x.std()
    return np.clip(0.5 + 0.15 * x, 0, 1).astype(np.float32)


def test_frechet_distance_of_identical_sets_is_zero_and_of_shifted_ones_the_squared_shift():
    a = np.random.default_rng(0).standard_normal((400, 16)) @ np.diag(np.linspace(0.5, 2, 16))
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = np.linspace(-1, 1, 16)
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    b = np.random.default_rng(1).standard_normal((400, 16)) * 3      # wider: FD grows
    assert frechet_distance(a, b) > 10


def test_frechet_distance_with_fewer_samples_than_dimensions_matches_the_eigenvalue_formula():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((30, 64)), rng.standard_normal((25, 64)) * 1.5 + 0.2
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((600, 32)), rng.standard_normal((600, 32))
    same = kid(a, b, subset_size=300)
    different = kid(a, b + 0.5, subset_size=300)
    assert abs(same) < 0.02
    assert different > 0.05 and different > 20 * abs(same)


def test_seam_ratio_is_one_for_smooth_images_and_high_for_independent_blocks():
    smooth = _smooth_images(200, 32, seed=0)
    for b in (2, 4):
        assert seam_ratio(smooth, b) == pytest.approx(1.0, abs=0.1)
    assert seam_ratio((smooth[..., None] * 255).astype(np.uint8), 2) == pytest.approx(1.0, abs=0.1)
    assert seam_ratio(smooth, 1) is None

    rng = np.random.default_rng(1)
    levels = rng.random((200, 4, 4))                                  # one random grey per block
    blocky = np.kron(levels, np.ones((8, 8))) + 0.02 * rng.standard_normal((200, 32, 32))
    assert seam_ratio(blocky, 4) > 5
    rgb = np.repeat(blocky[..., None], 3, axis=-1)
    assert seam_ratio(rgb, 4) == pytest.approx(seam_ratio(blocky, 4))


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(0)
    train, queries = rng.random((300, 6, 6)), rng.random((70, 6, 6))
    brute = np.sqrt(((queries.reshape(70, 1, -1) - train.reshape(1, 300, -1)) ** 2).sum(-1)).min(1)
    got = nearest_distances(queries, train, query_chunk=16, train_chunk=64)
    np.testing.assert_allclose(got, brute, rtol=1e-4)


def _perturbed(images, norms, seed):
    """Each image plus noise of exactly the given L2 norm."""
    noise = np.random.default_rng(seed).standard_normal(images.shape).astype(np.float32)
    noise /= np.linalg.norm(noise.reshape(len(images), -1), axis=1).reshape(-1, 1, 1)
    return images + noise * np.asarray(norms, np.float32).reshape(-1, 1, 1)


def test_copy_margins_match_brute_force_and_judge_each_image_by_its_own_round_trip():
    rng = np.random.default_rng(0)
    train, queries, radii = rng.random((200, 6, 6)), rng.random((40, 6, 6)), rng.random(200)
    brute = (np.sqrt(((queries.reshape(40, 1, -1) - train.reshape(1, 200, -1)) ** 2).sum(-1)) - radii).min(1)
    np.testing.assert_allclose(copy_margins(queries, train, radii, query_chunk=16, train_chunk=64), brute,
                               rtol=1e-4, atol=1e-5)
    train = _smooth_images(300, 16, seed=0)
    radii = np.where(np.arange(300) % 2 == 0, 0.05, 1.0)        # a round trip near-exact, or not
    ids = np.arange(0, 40)
    inside = _perturbed(train[ids], radii[ids] * 0.9, seed=1)     # nearer than the image's own round trip
    outside = _perturbed(train[ids], radii[ids] * 1.5, seed=2)
    assert (copy_margins(inside, train, radii) <= 0).all()
    assert (copy_margins(outside[ids % 2 == 0], train, radii) > 0).all()   # a 0.075 blur of a flat one is no copy
    unseen = _smooth_images(100, 16, seed=3)
    assert np.mean(copy_margins(unseen, train, radii) <= 0) < 0.05


def test_unseen_test_images_leave_out_duplicates_and_known_variants():
    train = (_smooth_images(50, 8, seed=0) * 255).astype(np.uint8)[..., None]
    fresh = (_smooth_images(6, 8, seed=1) * 255).astype(np.uint8)[..., None]
    near = train[:2].copy()
    near[:, 0, 0] ^= 1                                                # one grey level off: the same picture
    test = np.concatenate([fresh, near])
    variants = np.zeros(len(test), bool)
    variants[0] = True                                                # the source says: a variant
    data = datasets.ImageSet("made-up", train, test, None, None, [], "", "", test_variants=variants)
    unseen, dropped = evaluation._unseen_test(data, train.astype(np.float32) / 255, seed=0)
    assert dropped == 3 and np.array_equal(test[unseen], fresh[1:])


def test_block_agreement_sees_images_stitched_from_different_images():
    train = _smooth_images(200, 16, seed=0, cutoff=2)
    assert block_agreement(train[:40], train, 2, k=5) == 1.0           # each block finds its own image
    chimeras = train[:40].copy()
    chimeras[:, 8:, :] = train[100:140, 8:, :]                        # lower halves from other images
    assert block_agreement(chimeras, train, 2, k=5) < 0.2
    assert block_agreement(train[:4], train, 1) is None


def test_reference_features_are_computed_once_and_keyed_by_the_pixels(monkeypatch):
    calls = []

    def fake_features(images):
        calls.append(len(images))
        return np.tile(images.reshape(len(images), -1)[:, :1].astype(np.float64), (1, 1280))

    monkeypatch.setattr(evaluation, "features", fake_features)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    first = cached_features(images)
    again = cached_features(images.copy())
    assert calls == [5] and np.array_equal(first, again)
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert not np.array_equal(cached_features(changed), first) and calls == [5, 5]
    for path in evaluation.feature_cache_dir().glob("*.npy"):     # a damaged cache is recomputed
        path.write_bytes(b"not a numpy file")
    assert np.array_equal(cached_features(images), first) and calls == [5, 5, 5]


def _is_share_of(value: float, count: int) -> bool:
    """A share of `count` images: k / count for a whole k from 0 to count."""
    return 0 <= value * count <= count and abs(value * count - round(value * count)) < 1e-6


def test_evaluate_a_tiny_bundle_end_to_end(tiny_bundle):
    lines = []
    result = evaluate(tiny_bundle, n=20, data=str(SAMPLE), steps=10, seed=0, log=lines.append)
    for key in ("fd_effnetlite0", "kid_effnetlite0", "seam_ratio_generated", "seam_ratio_reference",
                "seam_ratio_reconstructed",
                "copying_score", "copying_score_test", "copying_radius_median",
                "nearest_train_distance_generated_median", "nearest_train_distance_test_median",
                "block_agreement_generated", "block_agreement_test", "block_agreement_reconstructed",
                "coherence_judge_accuracy", "incoherent_generated", "incoherent_reconstructed",
                "label_accuracy", "classifier_test_accuracy",
                "n", "reference", "target", "steps", "seed", "seconds"):
        assert key in result, key
        if isinstance(result[key], float):
            assert math.isfinite(result[key]), key
    assert result["n"] == 20 and result["reference"] == "test" and result["steps"] == 10
    assert result["fd_effnetlite0"] > 0
    assert None not in (result["seam_ratio_generated"], result["seam_ratio_reference"],
                        result["seam_ratio_reconstructed"])
    assert result["copying_method"] == "autoencoder round trip" and result["copying_radius_median"] > 0
    unseen = result["copying_test_images"]
    assert unseen > 0
    # Each share counts whole images of its own set: generated (n), unseen test images, their round trips.
    for key, count in (("copying_score", 20), ("block_agreement_generated", 20), ("copying_score_test", unseen),
                       ("block_agreement_test", unseen), ("block_agreement_reconstructed", unseen),
                       ("incoherent_generated", 20), ("incoherent_unseen_reconstructed", unseen)):
        assert _is_share_of(result[key], count), (key, result[key], count)
    per_label = result["label_accuracy_per_label"]
    assert per_label and all(_is_share_of(v, 20) for v in per_label.values())      # 20 images per label
    assert result["label_accuracy"] == pytest.approx(sum(per_label.values()) / len(per_label))
    per_test_label = result["classifier_test_accuracy_per_label"]
    assert set(per_label) <= set(per_test_label) and all(0 <= x <= 1 for x in per_test_label.values())
    assert lines, "evaluate reports progress through log"
    for key in ("classifier_test_balanced_accuracy", "classifier_unseen_test_accuracy",
                "classifier_unseen_test_balanced_accuracy"):
        assert result[key] is None or 0 <= result[key] <= 1, key
    alone, _ = evaluation.label_accuracy(tiny_bundle, per_label=20, seed=0, steps=10, data=str(SAMPLE),
                                         log=lambda _: None)
    assert {k: v for k, v in alone.items() if k in result} == {k: result[k] for k in alone if k in result}


def test_evaluate_a_run_directory(tiny_run):
    result = evaluate(tiny_run, n=8, steps=5, seed=1, log=lambda _: None)   # data from the run's config
    assert result["kind"] == "run" and result["reference_images"] == 8
    assert math.isfinite(result["fd_effnetlite0"]) and math.isfinite(result["kid_effnetlite0"])
    assert result["label_accuracy"] is None and result["seam_ratio_generated"] is not None
    assert math.isfinite(result["seam_ratio_reconstructed"])


def test_guidance_reaches_the_images_of_a_run_and_of_a_bundle(tiny_run, tiny_bundle):
    """A run records no guidance (1 unless asked); a bundle its recommended scale: evaluate
    says which one it measured, and another scale gives other images."""
    plain = evaluate(tiny_run, n=8, steps=5, seed=1, log=lambda _: None)
    guided = evaluate(tiny_run, n=8, steps=5, seed=1, guidance=3.0, log=lambda _: None)
    assert plain["guidance"] == 1.0 and guided["guidance"] == 3.0
    assert guided["fd_effnetlite0"] != plain["fd_effnetlite0"]
    run = evaluation._open_target(tiny_run, lambda _: None, 3.0)
    bundle = evaluation._open_target(tiny_bundle, lambda _: None)
    try:
        assert bundle.guidance == Bundle.open(tiny_bundle).manifest.get("sampling", {}).get("guidance", 1.0)
        m = RunModels.load(tiny_run)
        ids = np.random.default_rng(1).integers(0, len(m.db.codes), 4).tolist()
        assert np.array_equal(run.generate(4, 1, 5), torch_generate(m, ids, 1, 5, guidance=3.0))
    finally:
        bundle.close()
    with pytest.raises(UsageError, match="guidance"):
        evaluate(tiny_run, n=8, steps=5, guidance=-1.0)
    with pytest.raises(UsageError, match="guidance"):
        evaluate(tiny_bundle, n=8, steps=5, data=str(SAMPLE), guidance=21.0)


def test_a_whole_latent_run_is_measured_at_its_block_counterparts_grid(tiny_run, tiny_config, tmp_path):
    run = train_variant(tiny_run, tiny_config, tmp_path / "whole", "whole")
    result = evaluate(run, n=8, steps=5, seed=1, log=lambda _: None)
    block = evaluate(tiny_run, n=8, steps=5, seed=1, log=lambda _: None)
    assert result["blocks_per_side"] == block["blocks_per_side"] == 2
    assert math.isfinite(result["seam_ratio_generated"])
    assert result["seam_ratio_reference"] == block["seam_ratio_reference"]


def test_evaluate_refuses_bad_input_in_one_line(tiny_bundle, tiny_run, tmp_path):
    with pytest.raises(UsageError, match="at least 2"):
        evaluate(tiny_bundle, n=1, data=str(SAMPLE))
    with pytest.raises(UsageError, match="not found"):
        evaluate(tmp_path / "missing.rissole", n=20)
    with pytest.raises(UsageError, match="reference"):
        evaluate(tiny_bundle, n=20, reference="validation", data=str(SAMPLE))
    with pytest.raises(UsageError, match="data") as caught:           # "fashion-sample" is no known source
        evaluate(tiny_bundle, n=20, log=lambda _: None)
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="config.json"):
        evaluate(tmp_path, n=20)
    (tmp_path / "config.json").write_bytes((tiny_run / "config.json").read_bytes())
    with pytest.raises(UsageError, match="not trained"):
        evaluate(tmp_path, n=20)


def test_a_bundle_reconstructs_like_the_run_it_was_exported_from(tiny_run, tiny_bundle):
    """The seam-ratio control must go through the same autoencoder whatever the target's form:
    a wrong latent scale or channel order in the ONNX round trip would fail this."""
    images = datasets.load(str(SAMPLE), config.load(tiny_run / "config.json").data).test
    run = evaluation._open_target(tiny_run, lambda _: None)
    bundle = evaluation._open_target(tiny_bundle, lambda _: None)
    try:
        a, b = run.reconstruct(images), bundle.reconstruct(images)
    finally:
        bundle.close()
    error = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()
    baseline = np.abs(a.astype(np.float32) - images.astype(np.float32)).mean()
    assert a.shape == b.shape == images.shape and error < baseline / 4


def test_the_label_classifier_is_the_same_however_busy_the_machine(tiny_run):
    """Its step count is fixed, so label accuracy is a function of the target and the seed."""
    data = datasets.load(str(SAMPLE), config.load(tiny_run / "config.json").data)
    nets = [evaluation.train_classifier(data.train, data.train_labels, len(data.class_names), seed=3,
                                        log=lambda _: None) for _ in range(2)]
    a, b = (net.state_dict() for net in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    accuracy = np.mean(evaluation.classify(nets[0], data.train) == data.train_labels)
    assert accuracy > 2 / len(data.class_names)        # and it learned: twice chance or better


def test_the_label_classifier_draws_every_class_equally_often():
    """Twemoji's groups range from 32 to 2,194 images: drawn by image, the classifier learned to
    say people-body and recognised no real food emoji at all."""
    labels = np.array([0] * 950 + [1] * 45 + [2] * 5)
    draws = evaluation.balanced_draws(labels, 30000, np.random.default_rng(0))
    shares = np.bincount(labels[draws], minlength=3) / len(draws)
    assert np.allclose(shares, 1 / 3, atol=0.02)
    assert set(draws[labels[draws] == 2]) == set(range(995, 1000))       # every image of a class is drawn


def test_balanced_accuracy_counts_each_class_once():
    truth = np.array([0] * 90 + [1] * 10)
    majority = np.zeros(100, np.int64)                                   # always the big class
    scores = evaluation.class_accuracy(majority, truth, ["big", "small", "absent"])
    assert scores["accuracy"] == pytest.approx(0.9) and scores["balanced"] == pytest.approx(0.5)
    assert scores["per_label"] == {"big": 1.0, "small": 0.0}             # absent classes are left out


def test_the_label_classifier_recognises_a_rare_class():
    """90% of the training images are one class, and the classes overlap (flat grey images,
    levels drawn around 0.4 and 0.6 of white, spread 0.1): drawn by image, the classifier
    called about half of the rare images common (0.55 measured with uniform draws); balanced,
    it recognises each class about as well (0.87 and 0.83)."""
    rng = np.random.default_rng(0)

    def grey(n, level):
        levels = np.clip(rng.normal(level, 0.1, (n, 1, 1, 1)), 0, 1)
        return np.broadcast_to(levels * 255, (n, 16, 16, 1)).astype(np.uint8)

    train = np.concatenate([grey(900, 0.4), grey(100, 0.6)])
    labels = np.array([0] * 900 + [1] * 100)
    net = evaluation.train_classifier(train, labels, 2, seed=0, log=lambda _: None)
    rare, common = evaluation.classify(net, grey(400, 0.6)), evaluation.classify(net, grey(400, 0.4))
    assert np.mean(rare == 1) >= 0.75 and np.mean(common == 0) >= 0.7, (np.mean(rare == 1), np.mean(common == 0))

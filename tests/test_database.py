"""The neighbour database: compact codes, self-exclusion, HNSW recall at the chosen ef."""

import json

import hnswlib
import numpy as np

from rissole_export import config, data, database
from rissole_export.sampling import load_autoencoder

from conftest import SAMPLE


def test_codes_are_compact_indices_per_block(tiny_run):
    db = database.Database.load(tiny_run / "database")
    meta = db.meta
    side = meta["latent_side"] // meta["blocks_per_side"]
    assert db.codes.dtype == np.uint8
    assert db.codes.shape == (meta["images"], meta["blocks_per_side"] ** 2, side, side)


def test_no_image_is_its_own_neighbour(tiny_run):
    db = database.Database.load(tiny_run / "database")
    ids = np.arange(len(db.neighbours))[:, None]
    assert not (db.neighbours == ids).any()
    assert all(len(set(row)) == len(row) for row in db.neighbours)


def test_exact_duplicates_are_excluded(tiny_run, tmp_path):
    cfg = config.load(tiny_run / "config.json")
    pixels = data.load(str(SAMPLE), cfg.data).train
    with_copies = np.concatenate([pixels, pixels[:5]])          # image i and N+i are identical
    meta = database.build(load_autoencoder(tiny_run, cfg), with_copies, None, cfg.database,
                          cfg.denoiser.blocks_per_side, cfg.denoiser.k, tmp_path, 0, 1)
    assert meta["duplicates"] >= 5
    neighbours = np.load(tmp_path / "neighbours.npy")
    n = len(pixels)
    for i in range(5):
        assert n + i not in neighbours[i] and i not in neighbours[n + i]


def test_recall_at_the_chosen_ef_meets_the_target(tiny_run):
    meta = json.loads((tiny_run / "database" / "meta.json").read_text())
    keys = np.load(tiny_run / "database" / "keys.npy")
    index = hnswlib.Index(space="ip", dim=keys.shape[1])
    index.load_index(str(tiny_run / "database" / "index.bin"))
    queries = np.arange(len(keys))
    assert database.recall(index, keys, queries, meta["recall_k"], meta["ef"]) >= 0.95
    assert meta["query_us"] > 0 and meta["key_study"]


def test_recall_and_ef_choice_on_harder_keys():
    """Random keys are much harder than real latents: ef must rise to reach the target."""
    keys = np.random.default_rng(0).standard_normal((5000, 64)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    index = database.build_index(keys, 6, 20, 0)
    queries = np.arange(300)
    ef, reached = database.choose_ef(index, keys, queries, 9, 0.95)
    assert reached >= 0.95 and ef > 16
    assert database.recall(index, keys, queries, 9, ef) == reached
    assert database.recall(index, keys, queries, 9, 9) < reached

"""Relabelling a bundle's database: only when its entries are provably the data's training split."""

import numpy as np
import pytest

from rissole_edge.bundle import Bundle
from rissole_edge.errors import UsageError
from rissole_export import data as datasets
from rissole_export.config import DataConfig
from rissole_export.relabel import check_entries, relabel

from conftest import SAMPLE


def test_entries_must_be_the_training_images_in_order():
    codes = np.random.default_rng(0).integers(0, 512, (300, 4, 8, 8))
    assert check_entries(codes.astype(np.uint16), codes) == (300, 0)
    flipped = codes.copy()
    flipped[7, 0, 0, 0] = (flipped[7, 0, 0, 0] + 1) % 512            # one near-tie flipped
    assert check_entries(flipped.astype(np.uint16), codes) == (299, 1)
    with pytest.raises(UsageError, match="not this data's training split"):
        check_entries(codes[::-1].astype(np.uint16), codes)            # another order
    with pytest.raises(UsageError, match="entries"):
        check_entries(codes[:200].astype(np.uint16), codes)            # a --db-limit subset


def test_a_bundle_gets_its_data_labels_and_nothing_else_changes(tiny_bundle, tmp_path):
    out = tmp_path / "relabelled.rissole"
    manifest = relabel(tiny_bundle, str(SAMPLE), out, log=lambda _: None)
    before, after = Bundle.open(tiny_bundle), Bundle.open(out)
    after.verify_all()
    size = before.manifest["image"]["size"]
    expected = datasets.load(str(SAMPLE), DataConfig(size=size, channels=1))
    assert manifest["dataset"]["labels"] == expected.class_names
    assert np.array_equal(after.array("labels.npy", "int64"), expected.train_labels)
    for name in before.members:
        if name != "labels.npy":
            assert before.read(name) == after.read(name), name

"""What an image is generated from: label queries condition on that label's entries only, and a
Query names at most one source."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rissole_edge.errors import UsageError
from rissole_edge.generator import Generator, Query

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "fashion-mnist.rissole"


@pytest.fixture(scope="module")
def gen():
    with Generator.open(SHIPPED, threads=1) as g:
        yield g


def _conditioning_entries(gen: Generator, monkeypatch: pytest.MonkeyPatch, query: Query, n: int) -> np.ndarray:
    """The database entries whose blocks conditioned n generated images, seen on the retrieval
    path (every neighbour block the denoiser gets comes through Database.blocks)."""
    used: list[np.ndarray] = []
    real = gen.db.blocks

    def spy(ids: np.ndarray) -> np.ndarray:
        used.append(np.asarray(ids).copy())
        return real(ids)

    monkeypatch.setattr(gen.db, "blocks", spy)
    gen.generate(n, seed=3, steps=2, query=query, as_array=True)
    monkeypatch.setattr(gen.db, "blocks", real)
    entries = np.concatenate(used)             # a group's neighbours are gathered in one call
    assert len(entries) == n * gen.spec.k
    return entries.reshape(n, gen.spec.k)


@pytest.mark.parametrize("label", ["sneaker", "bag", "trouser"])
def test_a_label_query_conditions_on_neighbours_of_that_label(gen, monkeypatch, label):
    entries = _conditioning_entries(gen, monkeypatch, Query(label=label), 6)
    assert (gen.db.labels[entries] == gen.spec.labels.index(label)).all()


def test_without_a_label_neighbours_come_from_several_labels(gen, monkeypatch):
    """The control: the spy sees other labels when nothing restricts them, so the label test
    above would notice a label query that ignored its label."""
    entries = _conditioning_entries(gen, monkeypatch, Query(), 6)
    assert len(np.unique(gen.db.labels[entries])) > 1


@pytest.mark.parametrize("fields", [{"entry": 3, "like": "x.png"}, {"entry": 3, "label": "bag"},
                                    {"like": Image.new("L", (8, 8)), "label": "bag"},
                                    {"entry": 0, "like": "x.png", "label": "bag"}])
def test_a_query_with_two_sources_is_refused(fields):
    """Like the CLI's --query-id/--like/--label, instead of one source silently winning."""
    with pytest.raises(UsageError, match="at most one of entry, like and label"):
        Query(**fields)
    Query(**dict([next(iter(fields.items()))]))         # any one of them alone is a query


def _shrink_label(gen: Generator, monkeypatch: pytest.MonkeyPatch, label: str, keep: int) -> None:
    """Leave `label` only `keep` database entries (the rest join another label), as a small
    class of a user's image folder would, and ask the index live (no stored lists)."""
    labels = gen.db.labels.copy()
    ids = np.flatnonzero(labels == gen.spec.labels.index(label))
    labels[ids[keep:]] = (gen.spec.labels.index(label) + 1) % len(gen.spec.labels)
    monkeypatch.setattr(gen.db, "labels", labels)
    monkeypatch.setattr(gen.db, "entry_lists", None)


def test_a_label_smaller_than_the_index_query_still_generates(gen, monkeypatch):
    """hnswlib refuses to return more ids than its filter admits, and a live query asks for
    window + 8 = 16: a 6-image label used to end in hnswlib's RuntimeError."""
    _shrink_label(gen, monkeypatch, "bag", 6)
    entries = _conditioning_entries(gen, monkeypatch, Query(label="bag"), 4)
    assert (gen.db.labels[entries] == gen.spec.labels.index("bag")).all()


def test_a_label_too_small_for_k_neighbours_is_a_usage_error(gen, monkeypatch):
    _shrink_label(gen, monkeypatch, "bag", gen.spec.k)       # the query entry and k - 1 others
    with pytest.raises(UsageError, match=f"label 'bag' holds only {gen.spec.k - 1} images"):
        gen.generate(1, seed=3, steps=2, query=Query(label="bag"), as_array=True)

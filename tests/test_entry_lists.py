"""entry_neighbours.npy: each database entry's neighbour lists, precomputed so that a query from
an entry needs no HNSW index. The lists must be exactly what the index answers, so images do not
change; bundles without them still work; a malformed table is refused in one line."""

from pathlib import Path

import numpy as np
import pytest

from rissole_edge.bundle import Bundle, BundleError, Spec
from rissole_edge.generator import Generator, Query
from rissole_edge.retrieval import ENTRY_NEIGHBOURS, Database, entry_neighbours_dtype
from rissole_export import pack
from rissole_export.entry_lists import add_entry_lists
from rissole_export.rebuild import build_db

from conftest import SAMPLE, cli

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "fashion-mnist.rissole"


def _rewritten(source: Path, out: Path, table: np.ndarray | None) -> Path:
    """`source` with entry_neighbours.npy replaced by `table` (None: without the member)."""
    manifest, members = pack.contents(Bundle.open(source))
    members.pop(ENTRY_NEIGHBOURS, None)
    if table is not None:
        members[ENTRY_NEIGHBOURS] = pack.npy(table)
    pack.write(out, manifest, members)
    return out


def _live_rows(db: Database, entry: int) -> list[np.ndarray]:
    """What the index answers for an entry: any label, then its own label."""
    key, own = db.key_of_entry(entry), db.codes[entry]
    return [db.candidates(key, own, label, exclude=entry) for label in (None, int(db.labels[entry]))]


def _stored_rows(db: Database, entry: int) -> list[np.ndarray]:
    filler = entry_neighbours_dtype(db.spec.images)[1]
    return [row[row != filler].astype(np.int64) for row in db.entry_lists[entry]]


def _check_every_entry(bundle: Path, entries) -> None:
    with Generator.open(bundle, threads=1) as gen:
        db = gen.db
        assert db.entry_lists is not None
        for entry in entries:
            for stored, live in zip(_stored_rows(db, entry), _live_rows(db, entry)):
                assert np.array_equal(stored, live), entry
                assert entry not in stored and len(stored) >= gen.spec.k


def test_the_lists_are_the_live_queries_for_every_entry(tiny_bundle):
    """The exporter wrote them (tiny_bundle is `export`'s output); each equals the index's answer."""
    spec = Spec.from_manifest(Bundle.open(tiny_bundle).manifest)
    _check_every_entry(tiny_bundle, range(spec.images))


def test_build_db_writes_the_lists_of_its_new_database(tiny_bundle, tmp_path):
    out = tmp_path / "rebuilt.rissole"
    build_db(tiny_bundle, SAMPLE, out, log=lambda _: None)
    _check_every_entry(out, range(Spec.from_manifest(Bundle.open(out).manifest).images))


def test_the_shipped_lists_are_the_live_queries():
    """The shipped default bundle, on a seeded sample of its 15,000 entries (all of them: the
    slow test above does that on an exported bundle)."""
    spec = Spec.from_manifest(Bundle.open(SHIPPED).manifest)
    _check_every_entry(SHIPPED, np.random.default_rng(0).permutation(spec.images)[:300])


@pytest.mark.parametrize("query", [Query(), Query(label="bag"), Query(entry=11)])
def test_images_are_the_same_with_and_without_the_lists(tmp_path, query):
    """Generating from the lists never loads the index; the bundle without them (an old one)
    asks the index and gets the same pixels."""
    old = _rewritten(SHIPPED, tmp_path / "old.rissole", None)
    with Generator.open(SHIPPED, threads=1) as new_gen, Generator.open(old, threads=1) as old_gen:
        new = new_gen.generate(5, seed=4, steps=2, query=query, as_array=True)
        assert new_gen.db._index is None
        assert np.array_equal(new, old_gen.generate(5, seed=4, steps=2, query=query, as_array=True))
        assert old_gen.db._index is not None


def test_adding_the_lists_to_an_old_bundle_reproduces_the_shipped_ones(tmp_path):
    old = _rewritten(SHIPPED, tmp_path / "old.rissole", None)
    add_entry_lists(old, tmp_path / "new.rissole")
    assert Bundle.open(tmp_path / "new.rissole").read(ENTRY_NEIGHBOURS) == Bundle.open(SHIPPED).read(ENTRY_NEIGHBOURS)


def _damaged(table: np.ndarray, how: str, images: int) -> np.ndarray:
    table = table.copy()
    if how == "id past the database":
        table[5, 0, 2] = images
    elif how == "gap":
        table[5, 0, 0] = entry_neighbours_dtype(images)[1]
    elif how == "dtype":
        table = table.astype(np.int64)
    else:
        table = table[:-1]
    return table


@pytest.mark.parametrize("how", ["id past the database", "gap", "dtype", "shape"])
def test_a_malformed_table_is_refused_in_one_line(tmp_path, how):
    bundle = Bundle.open(SHIPPED)
    images = Spec.from_manifest(bundle.manifest).images
    table = bundle.array(ENTRY_NEIGHBOURS)
    bad = _rewritten(SHIPPED, tmp_path / "bad.rissole", _damaged(table, how, images))
    with pytest.raises(BundleError, match=ENTRY_NEIGHBOURS):
        Generator.open(bad)
    proc = cli("generate", "-m", str(bad), "-n", "1", "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ENTRY_NEIGHBOURS in proc.stderr and not (tmp_path / "out").exists()

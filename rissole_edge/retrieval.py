"""The neighbour database at run time: which images condition a generation, and their blocks.

Training and sampling see the same kind of neighbour list (method.md): the query itself and
its exact duplicates never appear, and k neighbours are drawn from the nearest `window`,
kept in rank order.

A query from a database entry (the default, `--label`, `--query-id`) asks the index the same
question every time, so bundles carry the answers (`entry_neighbours.npy`, written by the
exporter with `candidates` below) and the HNSW index is loaded only for a query by image:
the index is about 10 MB of a default `generate`'s RSS (benchmarks/results/memory.md).
Bundles without the member ask the index, with the same result.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import TYPE_CHECKING

import numpy as np

from . import blocks
from .bundle import Bundle, BundleError, Spec
from .errors import UsageError
from .index_guard import check_index

if TYPE_CHECKING:
    import hnswlib

ENTRY_NEIGHBOURS = "entry_neighbours.npy"


def draw_neighbours(candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k of the nearest candidates (ids, nearest first), drawn without replacement, in rank order."""
    if len(candidates) < k:
        raise ValueError(f"{len(candidates)} candidate neighbours, {k} needed")
    picked = np.sort(rng.permutation(len(candidates))[:k])
    return candidates[picked]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)).astype(np.float32)


def keys_of(latents: np.ndarray, key: str, blocks_per_side: int) -> np.ndarray:
    """The vectors images are found by, (N, C, h, w) -> (N, D): the whole latent or one block
    of it ("block:N"), flattened and L2-normalised (cosine similarity). The toolchain builds the
    database with this and the runtime computes `--like` queries with it."""
    if key == "latent":
        flat = latents.reshape(len(latents), -1)
    else:
        flat = blocks.split(latents, blocks_per_side)[:, int(key.split(":")[1])].reshape(len(latents), -1)
    return _unit_rows(flat.astype(np.float32))


def project(keys: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """PCA-reduce keys (it keeps the index small), then L2-normalise again."""
    return _unit_rows((keys - mean) @ components.T)


def entry_neighbours_dtype(images: int) -> tuple[np.dtype, int]:
    """The dtype of `entry_neighbours.npy` for a database of `images` entries and its filler
    value (the dtype's largest, never an id): uint16 up to 65,535 entries, else uint32."""
    dtype = np.dtype("<u2") if images < 0xFFFF else np.dtype("<u4")
    return dtype, int(np.iinfo(dtype).max)


def load_entry_neighbours(bundle: Bundle, spec: Spec) -> np.ndarray | None:
    """The member `entry_neighbours.npy` (images, 2, window), checked; None when the bundle
    has none (it was made before the member existed)."""
    if ENTRY_NEIGHBOURS not in bundle.members:
        return None
    dtype, filler = entry_neighbours_dtype(spec.images)
    table = bundle.array(ENTRY_NEIGHBOURS, dtype.str, (spec.images, 2, spec.window))
    present = table != filler
    if (table[present] >= spec.images).any() or (present[..., 1:] & ~present[..., :-1]).any():
        raise BundleError(f"the bundle's {ENTRY_NEIGHBOURS} is malformed: an id outside the database "
                          "or a gap in a list")
    return table


def open_index(bundle: Bundle, spec: Spec) -> hnswlib.Index:
    """hnswlib loads only from a path: check the member, then write it to a private temp file.
    Its bytes are dropped before hnswlib reads the file, so that the process never holds the
    index twice."""
    import hnswlib       # here, not at the top: a generation from entry_neighbours.npy never loads it

    data = bundle.read("index.bin")
    check_index(data, spec.images, spec.key_dim)
    fd, path = tempfile.mkstemp(prefix="rissole-index-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        del data
        index = hnswlib.Index(space="ip", dim=spec.key_dim)
        index.load_index(path, max_elements=spec.images)
    except RuntimeError as e:
        raise BundleError(f"the bundle's HNSW index does not load: {e}") from None
    finally:
        os.unlink(path)
    if index.get_current_count() != spec.images:
        raise BundleError(f"the bundle's HNSW index holds {index.get_current_count()} images, "
                          f"the manifest says {spec.images}")
    return index


class Database:
    """Neighbour blocks (code indices), optional labels, each entry's neighbour lists when the
    bundle has them, and the HNSW index, loaded on first use."""

    def __init__(self, bundle: Bundle, spec: Spec):
        self.bundle, self.spec = bundle, spec
        s, p = spec.block_side, spec.positions
        code_dtype = "uint8" if spec.codebook_size <= 256 else "uint16"
        self.codes = bundle.array("codes.npy", code_dtype, (spec.images, p, s, s))
        self.codebook = bundle.array("codebook.npy", "float32", (spec.codebook_size, spec.latent_channels))
        if self.codes.max(initial=0) >= spec.codebook_size:
            raise BundleError("the bundle's neighbour codes point outside its codebook")
        self.pca_mean = bundle.array("pca_mean.npy", "float32")
        self.pca = bundle.array("pca_components.npy", "float32")
        key_size = spec.latent_channels * (spec.latent_side ** 2 if spec.key == "latent" else spec.block_side ** 2)
        if self.pca_mean.shape != (key_size,) or self.pca.shape != (spec.key_dim, key_size):
            raise BundleError("the bundle's key projection does not match its key and key_dim")
        self.labels = (bundle.array("labels.npy", "int64", (spec.images,)) if spec.labels else None)
        self.entry_lists = load_entry_neighbours(bundle, spec) if spec.k else None
        self._index: hnswlib.Index | None = None
        self._lock = threading.Lock()       # hnswlib's set_ef/filter state is per index

    @property
    def index(self) -> hnswlib.Index:
        """The HNSW index, loaded (and checked) on first use."""
        return self.load_index()

    def load_index(self) -> hnswlib.Index:
        """Load and check the HNSW index now, if not yet: a query by image needs it, and
        `verify` checks it although generation from entry_neighbours.npy does not."""
        with self._lock:
            if self._index is None:
                self._index = open_index(self.bundle, self.spec)
                self._index.set_ef(max(self.spec.ef, self.spec.window + 1))
            return self._index

    def label_id(self, name: str) -> int:
        if not self.spec.labels:
            raise UsageError("this bundle has no class labels; drop --label")
        if name not in self.spec.labels:
            raise UsageError(f"unknown label {name!r}; this bundle knows: {', '.join(self.spec.labels)}")
        return self.spec.labels.index(name)

    def random_entry(self, rng: np.random.Generator, label: int | None = None) -> int:
        if label is None:
            return int(rng.integers(self.spec.images))
        ids = np.flatnonzero(self.labels == label)
        return int(ids[rng.integers(len(ids))])

    def key_of_entry(self, entry: int) -> np.ndarray:
        index = self.index
        with self._lock:
            return np.asarray(index.get_items([entry]), dtype=np.float32)[0]

    def key_of_latent(self, latent: np.ndarray) -> np.ndarray:
        """The retrieval key of a (C, h, w) latent, computed as the exporter did for the database."""
        full = keys_of(latent[None], self.spec.key, self.spec.blocks_per_side)
        return project(full, self.pca_mean, self.pca)[0]

    def candidates(self, key: np.ndarray, own_codes: np.ndarray | None, label: int | None = None,
                   exclude: int | None = None) -> np.ndarray:
        """The ids neighbours are drawn from, nearest first: the nearest `window` by the index
        (never `exclude`, never an entry whose latent equals `own_codes`, only `label` if given).
        A label with no more entries than the query asks for is ranked exactly instead, since
        hnswlib refuses to return more ids than its filter admits (a small class of a user's
        image folder); the result may then hold fewer than k ids, which `draw` refuses."""
        want = min(self.spec.images, self.spec.window + 8)
        members = np.flatnonzero(self.labels == label) if label is not None else None
        index = self.index
        with self._lock:
            if members is not None and len(members) <= want:
                items = np.asarray(index.get_items(members), dtype=np.float32)
                found = members[np.argsort(-(items @ key), kind="stable")]
            else:
                labels = self.labels
                filt = (lambda i: labels[i] == label) if label is not None else None
                index.set_ef(max(self.spec.ef, want))
                found = index.knn_query(key[None], k=want, num_threads=1, filter=filt)[0][0]
        kept = [int(i) for i in found if i != exclude
                and (own_codes is None or not np.array_equal(self.codes[i], own_codes))]
        return np.array(kept[:self.spec.window], dtype=np.int64)

    def entry_candidates(self, entry: int, label: int | None = None) -> np.ndarray:
        """`candidates` of a database entry's own key, without itself: row 0 (any label) or 1
        (its own label) of `entry_neighbours.npy` when the bundle has it and the row holds at
        least k ids, else asked of the index."""
        if self.entry_lists is not None and (label is None or self.labels[entry] == label):
            ids = self.entry_lists[entry, 0 if label is None else 1]
            ids = ids[ids != entry_neighbours_dtype(self.spec.images)[1]].astype(np.int64)
            if len(ids) >= self.spec.k:
                return ids
        return self.candidates(self.key_of_entry(entry), self.codes[entry], label, exclude=entry)

    def neighbours(self, key: np.ndarray, own_codes: np.ndarray | None, rng: np.random.Generator,
                   label: int | None = None) -> np.ndarray:
        """k neighbour ids of a query key (a query by image), drawn from its `candidates`."""
        return self.draw(self.candidates(key, own_codes, label), rng, label)

    def entry_neighbours(self, entry: int, rng: np.random.Generator, label: int | None = None) -> np.ndarray:
        """k neighbour ids of a database entry, drawn from its `entry_candidates`."""
        return self.draw(self.entry_candidates(entry, label), rng, label)

    def draw(self, candidates: np.ndarray, rng: np.random.Generator, label: int | None) -> np.ndarray:
        """`draw_neighbours`, or a usage error when too few distinct images are there to draw
        from: only a label with at most k images besides the query can leave so few."""
        if len(candidates) < self.spec.k:
            where, fix = ((f"label {self.spec.labels[label]!r}", "; choose another label") if label is not None
                          else ("the database", ""))
            raise UsageError(f"{where} holds only {len(candidates)} images besides the query and its exact "
                             f"copies in this bundle, and a query needs k = {self.spec.k}{fix}")
        return draw_neighbours(candidates, self.spec.k, rng)

    def blocks(self, ids: np.ndarray) -> np.ndarray:
        """Scaled latent blocks of entries: (len(ids), P, C, s, s) float32."""
        vectors = self.codebook[self.codes[ids]]              # (n, P, s, s, C)
        return (np.moveaxis(vectors, -1, 2) * self.spec.latent_scale).astype(np.float32)


def entry_neighbour_table(db: Database) -> np.ndarray:
    """What `entry_neighbours.npy` holds: every entry's `candidates` from the index, as a live
    query asks them (row 0 any label, row 1 the entry's own label; no labels: row 1 empty),
    padded with the filler value. A row the index cannot fill with k ids stays empty, so that
    the runtime asks the index and behaves as it would without the member."""
    spec = db.spec
    dtype, filler = entry_neighbours_dtype(spec.images)
    table = np.full((spec.images, 2, spec.window), filler, dtype)
    for entry in range(spec.images):
        key, own = db.key_of_entry(entry), db.codes[entry]
        for row, label in enumerate([None] + ([int(db.labels[entry])] if db.labels is not None else [])):
            ids = db.candidates(key, own, label, exclude=entry)
            if len(ids) >= spec.k:
                table[entry, row, :len(ids)] = ids
    return table

"""The neighbour database at run time: which images condition a generation, and their blocks.

Training and sampling see the same kind of neighbour list (method.md): the query itself and
its exact duplicates never appear, and k neighbours are drawn from the nearest `window`,
kept in rank order.
"""

from __future__ import annotations

import os
import tempfile
import threading

import hnswlib
import numpy as np

from . import blocks
from .bundle import Bundle, BundleError, Spec
from .errors import UsageError
from .index_guard import check_index


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


def load_index(bundle: Bundle, spec: Spec) -> hnswlib.Index:
    """hnswlib loads only from a path: check the member, then write it to a private temp file.
    Its bytes are dropped before hnswlib reads the file, so that the process never holds the
    index twice."""
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
    """HNSW index + neighbour blocks (code indices) + optional labels."""

    def __init__(self, bundle: Bundle, spec: Spec):
        self.spec = spec
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
        self.index = load_index(bundle, spec)
        self.index.set_ef(max(spec.ef, spec.window + 1))
        self._lock = threading.Lock()       # hnswlib's set_ef/filter state is per index

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
        with self._lock:
            return np.asarray(self.index.get_items([entry]), dtype=np.float32)[0]

    def key_of_latent(self, latent: np.ndarray) -> np.ndarray:
        """The retrieval key of a (C, h, w) latent, computed as the exporter did for the database."""
        full = keys_of(latent[None], self.spec.key, self.spec.blocks_per_side)
        return project(full, self.pca_mean, self.pca)[0]

    def neighbours(self, key: np.ndarray, own_codes: np.ndarray | None, rng: np.random.Generator,
                   label: int | None = None, exclude: int | None = None) -> np.ndarray:
        """k neighbour ids: the nearest `window` (never `exclude`, never an entry whose latent
        equals `own_codes`, only `label` if given), then k drawn from them."""
        want = min(self.spec.images, self.spec.window + 8)
        labels = self.labels
        filt = (lambda i: labels[i] == label) if label is not None else None
        with self._lock:
            self.index.set_ef(max(self.spec.ef, want))
            found, _ = self.index.knn_query(key[None], k=want, num_threads=1, filter=filt)
        kept = [int(i) for i in found[0] if i != exclude
                and (own_codes is None or not np.array_equal(self.codes[i], own_codes))]
        return draw_neighbours(np.array(kept[:self.spec.window]), self.spec.k, rng)

    def blocks(self, ids: np.ndarray) -> np.ndarray:
        """Scaled latent blocks of entries: (len(ids), P, C, s, s) float32."""
        vectors = self.codebook[self.codes[ids]]              # (n, P, s, s, C)
        return (np.moveaxis(vectors, -1, 2) * self.spec.latent_scale).astype(np.float32)

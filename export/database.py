"""The neighbour database: every training image's latent as code indices per block position,
retrieval keys, an HNSW index and self-excluded neighbour lists.

The database is the model's memory of "what whole images look like": the denoiser only ever
sees one block, and the neighbours' blocks carry the global layout.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np
import torch

from rissole_edge import blocks
from rissole_edge import retrieval
from rissole_edge.bundle import Bundle, Spec
from rissole_edge.retrieval import keys_of, project   # the runtime computes query keys the same way

from . import pack
from .autoencoder import VQAutoencoder
from .config import DatabaseConfig
from .pixels import to_tensor

FILES = ("codes.npy", "keys.npy", "pca.npz", "index.bin", "neighbours.npy", "meta.json")


@torch.no_grad()
def encode(ae: VQAutoencoder, pixels: np.ndarray, batch: int = 512) -> np.ndarray:
    """uint8 images (N, H, W, C) -> code indices (N, h, w), uint8 or uint16 as the codebook needs."""
    dtype = np.uint8 if ae.cfg.codebook_size <= 256 else np.uint16
    out = []
    for i in range(0, len(pixels), batch):
        x = to_tensor(pixels[i:i + batch])
        out.append(ae.encode_indices(x).numpy().astype(dtype))
    return np.concatenate(out)


def code_latents(codebook: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Code indices (..., h, w) -> latent vectors (..., D, h, w)."""
    return np.moveaxis(codebook[codes], -1, -3)


def fit_pca(keys: np.ndarray, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components (dim, D)) from at most 20k keys; reduces the index size."""
    rng = np.random.default_rng(seed)
    sample = keys[rng.permutation(len(keys))[:20000]]
    mean = sample.mean(0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    return mean.astype(np.float32), vt[:dim].astype(np.float32)


def build_index(keys: np.ndarray, m: int, ef_construction: int, seed: int) -> hnswlib.Index:
    """One thread, fixed seed: the same keys always give the same graph."""
    index = hnswlib.Index(space="ip", dim=keys.shape[1])
    index.init_index(max_elements=len(keys), M=m, ef_construction=ef_construction, random_seed=seed)
    index.add_items(keys, np.arange(len(keys)), num_threads=1)
    return index


def index_bytes(index: hnswlib.Index) -> bytes:
    """The index's file contents (hnswlib only saves to a path: go through a private temp dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "index.bin")
        index.save_index(str(path))
        return path.read_bytes()


def exact_knn(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ keys.T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(sims, top, 1).argsort(1)[:, ::-1]
    return np.take_along_axis(top, order, 1)


def recall(index: hnswlib.Index, keys: np.ndarray, query_ids: np.ndarray, k: int, ef: int) -> float:
    """Share of the exact top-k (brute force on the same keys) that HNSW returns at this ef."""
    index.set_ef(max(ef, k))
    found, _ = index.knn_query(keys[query_ids], k=k, num_threads=1)
    truth = exact_knn(keys, keys[query_ids], k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))


def choose_ef(index: hnswlib.Index, keys: np.ndarray, query_ids: np.ndarray, k: int,
              target: float) -> tuple[int, float]:
    """The smallest ef whose recall@k reaches `target` (or the best tried)."""
    best = (0, -1.0)
    for ef in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512):
        r = recall(index, keys, query_ids, k, ef)
        if r >= target:
            return ef, r
        best = max(best, (ef, r), key=lambda x: x[1])
    return best


@dataclass
class Retrieval:
    """A database's search side: its keys reduced by PCA, the HNSW index over them, and the
    smallest ef that reaches the target recall on a seeded sample of its own keys."""
    mean: np.ndarray            # PCA mean (key_size,); zeros when keys are not reduced
    components: np.ndarray      # PCA rows (key_dim, key_size); the identity when not reduced
    keys: np.ndarray            # (N, key_dim) what the index holds
    index: hnswlib.Index
    ef: int
    recall: float
    recall_k: int
    query_ids: np.ndarray       # the keys recall was measured on
    build_s: float              # wall time of the index construction alone

    def index_bytes(self) -> bytes:
        return index_bytes(self.index)


def build_retrieval(full_keys: np.ndarray, cfg: DatabaseConfig, seed: int) -> Retrieval:
    """PCA -> HNSW index -> ef, in one place for every database: training's, a subset kept by
    `export --db-limit`, and `build-db`'s. Each is fitted on its own images' keys. key_dim 0,
    or one at least the key size, keeps the keys whole."""
    if cfg.key_dim and cfg.key_dim < full_keys.shape[1]:
        mean, components = fit_pca(full_keys, cfg.key_dim, seed)
        keys = project(full_keys, mean, components)
    else:
        mean = np.zeros(full_keys.shape[1], np.float32)
        components = np.eye(full_keys.shape[1], dtype=np.float32)
        keys = np.ascontiguousarray(full_keys, dtype=np.float32)
    started = time.perf_counter()
    index = build_index(keys, cfg.hnsw_m, cfg.ef_construction, seed)
    build_s = time.perf_counter() - started
    query_ids = np.random.default_rng(seed).permutation(len(keys))[:min(1000, len(keys))]
    recall_k = min(len(keys), cfg.window + 1)
    ef, rec = choose_ef(index, keys, query_ids, recall_k, cfg.target_recall)
    index.set_ef(ef)
    return Retrieval(mean, components, keys, index, ef, rec, recall_k, query_ids, build_s)


def bundle_members(r: Retrieval, codes: np.ndarray, labels: np.ndarray | None) -> dict[str, bytes]:
    """A database as bundle members (codes (N, P, s, s) per block position, labels or None)."""
    members = {"codes.npy": pack.npy(codes), "index.bin": r.index_bytes(),
               "pca_mean.npy": pack.npy(r.mean), "pca_components.npy": pack.npy(r.components)}
    if labels is not None:
        members["labels.npy"] = pack.npy(labels.astype(np.int64))
    return members


def with_entry_neighbours(manifest: dict, members: dict[str, bytes]) -> dict[str, bytes]:
    """`members` with `entry_neighbours.npy` made afresh (last, as a new member goes): every
    entry's neighbour lists as the runtime's own query of this bundle's index returns them, so
    that generating from an entry needs no index. Every writer of a database or its labels
    (export, build-db, relabel) calls it just before `pack.write`; a bundle without retrieval
    (k = 0) gets none."""
    members = {name: data for name, data in members.items() if name != retrieval.ENTRY_NEIGHBOURS}
    spec = Spec.from_manifest(manifest)
    if spec.k == 0:
        return members
    table = retrieval.entry_neighbour_table(retrieval.Database(Bundle.in_memory(manifest, members), spec))
    return {**members, retrieval.ENTRY_NEIGHBOURS: pack.npy(table)}


def manifest_fields(r: Retrieval, cfg: DatabaseConfig) -> dict:
    """What `retrieval` in a manifest says about this database: its size and search settings,
    including the build settings that `build-db` reuses for a new database."""
    return {"images": int(len(r.keys)), "key": cfg.key, "key_dim": int(r.keys.shape[1]), "hnsw_m": cfg.hnsw_m,
            "ef_construction": cfg.ef_construction, "target_recall": cfg.target_recall,
            "ef": int(r.ef), "recall": float(r.recall)}


def duplicate_groups(codes: np.ndarray) -> np.ndarray:
    """A group id per image; images with identical latents share one. Exact pixel duplicates
    always have identical latents, so this catches them too."""
    digests = [hashlib.sha1(c.tobytes()).digest() for c in codes]
    first: dict[bytes, int] = {}
    return np.array([first.setdefault(d, i) for i, d in enumerate(digests)], dtype=np.int64)


def neighbour_lists(index: hnswlib.Index, keys: np.ndarray, groups: np.ndarray, window: int,
                    threads: int) -> np.ndarray:
    """The `window` nearest images of every image, never itself or one of its duplicates."""
    largest_group = int(np.bincount(groups).max())
    want = min(len(keys), window + largest_group)
    index.set_ef(max(index.ef, want))
    found, _ = index.knn_query(keys, k=want, num_threads=threads)
    out = np.empty((len(keys), window), dtype=np.int32)
    for i, row in enumerate(found):
        kept = row[groups[row] != groups[i]][:window]
        if len(kept) < window:
            raise ValueError(f"image {i} has fewer than {window} distinct neighbours; "
                             "lower database.window or add images")
        out[i] = kept
    return out


@dataclass
class KeyStudy:
    """How good a retrieval key is, measured by exact search on a sample of queries."""
    key: str
    dim: int
    label_agreement: float | None   # share of the k neighbours with the query's label
    latent_distance: float          # mean distance query -> neighbours over the WHOLE latent
    index_bytes_estimate: int


def study_keys(latents: np.ndarray, labels: np.ndarray | None, blocks_per_side: int, k: int,
               dims: tuple[int, ...], seed: int) -> list[KeyStudy]:
    """Compare candidate keys on what matters for generation: neighbours that agree with the
    query everywhere in the image (whole-latent distance), and in class when labels exist."""
    rng = np.random.default_rng(seed)
    queries = rng.permutation(len(latents))[:min(1000, len(latents))]
    flat = latents.reshape(len(latents), -1)
    out = []
    candidates = ["latent"] + [f"block:{p}" for p in (0, blocks_per_side * blocks_per_side // 2)]
    for key in dict.fromkeys(candidates):
        full = keys_of(latents, key, blocks_per_side)
        for dim in dict.fromkeys(min(d or full.shape[1], full.shape[1]) for d in dims):
            keys = full if dim == full.shape[1] else project(full, *fit_pca(full, dim, seed))
            nbrs = exact_knn(keys, keys[queries], k + 1)[:, 1:]      # drop the query itself
            dist = np.linalg.norm(flat[nbrs] - flat[queries][:, None], axis=2).mean()
            agree = float((labels[nbrs] == labels[queries][:, None]).mean()) if labels is not None else None
            out.append(KeyStudy(key, keys.shape[1], agree, float(dist),
                                len(latents) * (4 * keys.shape[1] + 8 * 16 + 16)))
    return out


def build(ae: VQAutoencoder, train: np.ndarray, labels: np.ndarray | None, cfg: DatabaseConfig,
          blocks_per_side: int, k: int, out: Path, seed: int, threads: int,
          dataset: dict | None = None) -> dict:
    """Encode the training split and write the database files into `out`; returns its meta."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)     # meta.json is written last: it marks "complete"
    codes = encode(ae, train)
    codebook = ae.codebook.embedding.detach().numpy().astype(np.float32)
    latents = code_latents(codebook, codes)                       # (N, D, h, w)
    if cfg.key != "latent" and int(cfg.key.split(":")[1]) >= blocks_per_side ** 2:
        raise ValueError(f"database.key {cfg.key} names a block beyond the {blocks_per_side ** 2} blocks")
    r = build_retrieval(keys_of(latents, cfg.key, blocks_per_side), cfg, seed)
    started = time.perf_counter()
    r.index.knn_query(r.keys[r.query_ids], k=r.recall_k, num_threads=1)
    query_us = (time.perf_counter() - started) / len(r.query_ids) * 1e6
    groups = duplicate_groups(codes)
    neighbours = neighbour_lists(r.index, r.keys, groups, cfg.window, threads)

    np.save(out / "codes.npy", blocks.split(codes[:, None], blocks_per_side)[:, :, 0])
    np.save(out / "keys.npy", r.keys)
    np.savez(out / "pca.npz", mean=r.mean, components=r.components)
    np.save(out / "neighbours.npy", neighbours)
    if labels is not None:
        np.save(out / "labels.npy", labels)
    r.index.save_index(str(out / "index.bin"))
    meta = {
        "images": len(codes), "latent_channels": int(latents.shape[1]), "latent_side": int(latents.shape[2]),
        "blocks_per_side": blocks_per_side, "latent_scale": float(1.0 / latents.std()),
        "key": cfg.key, "key_dim": int(r.keys.shape[1]), "hnsw_m": cfg.hnsw_m,
        "ef_construction": cfg.ef_construction, "ef": r.ef, "recall_k": r.recall_k, "recall": r.recall,
        "query_us": query_us, "build_s": r.build_s, "window": cfg.window,
        "duplicates": int(len(groups) - len(np.unique(groups))), "dataset": dataset or {},
        "index_bytes": (out / "index.bin").stat().st_size,
        "key_study": [vars(s) for s in study_keys(latents, labels, blocks_per_side, k,
                                                   (0, cfg.key_dim), seed)],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@dataclass
class Database:
    """A built database, loaded for denoiser training."""
    codes: np.ndarray        # (N, P, s, s) code indices per block position
    neighbours: np.ndarray   # (N, window) self-excluded neighbour ids, nearest first
    meta: dict

    @classmethod
    def load(cls, folder: Path) -> "Database":
        return cls(np.load(folder / "codes.npy", allow_pickle=False),
                   np.load(folder / "neighbours.npy", allow_pickle=False),
                   json.loads((folder / "meta.json").read_text()))

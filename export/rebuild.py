"""`rissole-edge build-db`: give a bundle a new neighbour database from an image folder.

The database is part of the model, not of the weights: swapping it changes what gets generated
without retraining. Images are encoded with the bundle's own ONNX encoder, so the new blocks
live in exactly the latent space the denoiser was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from rissole_edge import blocks
from rissole_edge.bundle import Bundle, Spec
from rissole_edge.errors import DataError, UsageError
from rissole_edge.generator import Generator
from rissole_edge.images import from_uint8
from rissole_edge.retrieval import keys_of

from . import data, database, pack
from .config import DatabaseConfig, DataConfig

SEED = 0


def _encode(encoder: ort.InferenceSession, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    latents, codes = [], []
    for i in range(0, len(pixels), 256):
        x = from_uint8(pixels[i:i + 256])
        z, c = encoder.run(["latent", "codes"], {"image": x})
        latents.append(z)
        codes.append(c)
    return np.concatenate(latents), np.concatenate(codes)


def build_db(bundle_path: Path, folder: Path, out: Path, log=print, signing_key: bytes | None = None) -> dict:
    if Path(out).resolve() == Path(bundle_path).resolve():
        raise UsageError("-o must name a new bundle, not the one being read")
    source = Bundle.open(bundle_path)
    manifest, source_members = pack.contents(source)
    spec = Spec.from_manifest(source.manifest)
    if "encoder.onnx" not in source.members:
        raise UsageError(f"{bundle_path} has no encoder, so it cannot encode new images")
    if spec.k == 0:
        raise UsageError(f"{bundle_path} does not use retrieval: it has no database to rebuild")
    m = source.manifest
    cfg = DataConfig(size=spec.image_size, channels=spec.image_channels,
                     background=m.get("image", {}).get("background", "#ffffff"), test_percent=0)
    images = data.load(str(folder), cfg)
    if len(images.train) < spec.window + 2:
        raise DataError(f"{len(images.train)} images are too few for a database: need at least {spec.window + 2}")
    log(f"encoding {len(images.train)} images with the bundle's encoder")
    with Generator.open(source) as gen:     # the runtime's checks: no external data in the encoder
        latents, codes = _encode(gen.encoder_session(), images.train)
    r = m["retrieval"]
    defaults = DatabaseConfig()
    db_cfg = DatabaseConfig(key=spec.key, key_dim=spec.key_dim, window=spec.window,
                            hnsw_m=r.get("hnsw_m", defaults.hnsw_m),
                            ef_construction=r.get("ef_construction", defaults.ef_construction),
                            target_recall=r.get("target_recall", defaults.target_recall))
    retrieval = database.build_retrieval(keys_of(latents, spec.key, spec.blocks_per_side), db_cfg, SEED)
    dtype = np.uint8 if spec.codebook_size <= 256 else np.uint16
    codes = blocks.split(codes[:, None].astype(dtype), spec.blocks_per_side)[:, :, 0]
    members = {name: source_members[name] for name in ("denoiser.onnx", "decoder.onnx", "encoder.onnx", "codebook.npy")}
    members.update(database.bundle_members(retrieval, codes, images.train_labels))
    manifest["retrieval"] = {**r, **database.manifest_fields(retrieval, db_cfg)}
    manifest["dataset"] = {"name": images.name, "licence": images.licence, "attribution": images.attribution,
                           "labels": images.class_names, "rebuilt_from": m.get("dataset", {}).get("name")}
    pack.write(Path(out), manifest, database.with_entry_neighbours(manifest, members), signing_key)
    return manifest

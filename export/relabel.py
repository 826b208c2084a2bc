"""Give a bundle's neighbour database the class labels of the data it was built from.

A bundle exported before its data source had labels (the shipped twemoji bundle) can learn
them without retraining: its database entries are the source's training images in order, so
the source's training labels are the entries' labels. That order is checked, not assumed: the
training images are encoded with the bundle's own encoder and must give the bundle's codes, or
the bundle is refused. Only labels.npy, the manifest's dataset.labels and the per-label neighbour
lists of entry_neighbours.npy change.

    python -m rissole_export.relabel models/twemoji.rissole twemoji -o models/twemoji.rissole
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rissole_edge import blocks
from rissole_edge.bundle import Bundle, Spec
from rissole_edge.errors import RissoleError, UsageError
from rissole_edge.generator import Generator

from . import data, database, pack
from .config import DataConfig
from .rebuild import _encode

# Encoding the same pixels with the bundle's ONNX encoder instead of the torch one the database
# was built with may flip a vector-quantisation near-tie: an entry may differ in this share of
# its code positions at most, and most entries must match exactly.
MAX_CODE_FLIPS = 0.01
MIN_EXACT_ENTRIES = 0.99


def check_entries(bundle_codes: np.ndarray, codes: np.ndarray) -> tuple[int, int]:
    """(entries whose codes match exactly, largest number of differing positions in one entry);
    raises UsageError unless the codes show that entry i is training image i for every i."""
    if bundle_codes.shape != codes.shape:
        raise UsageError(f"the bundle's database holds {bundle_codes.shape[0]} entries of shape "
                         f"{bundle_codes.shape[1:]}, the data gives {codes.shape[0]} of {codes.shape[1:]}: "
                         "it was not built from all of this data's training images")
    flips = (bundle_codes.astype(np.int64) != codes).reshape(len(codes), -1).sum(1)
    exact = int((flips == 0).sum())
    positions = codes[0].size
    if exact < MIN_EXACT_ENTRIES * len(codes) or flips.max() > MAX_CODE_FLIPS * positions:
        raise UsageError(f"the bundle's database is not this data's training split in order: {exact} of "
                         f"{len(codes)} entries match exactly, one differs in {flips.max()} of {positions} codes")
    return exact, int(flips.max())


def relabel(bundle_path: Path, source: str, out: Path, log=print) -> dict:
    """Write `out`: the bundle with the labels of `source`'s training split; returns its manifest."""
    bundle = Bundle.open(bundle_path)
    manifest, members = pack.contents(bundle)
    if bundle.signer:
        raise UsageError(f"{bundle_path} is signed, and relabelling would drop its signature: "
                         "relabel the unsigned bundle, then sign it")
    spec = Spec.from_manifest(bundle.manifest)
    m = bundle.manifest
    if "encoder.onnx" not in bundle.members:
        raise UsageError(f"{bundle_path} has no encoder, so its database cannot be checked against the data")
    images = data.load(source, DataConfig(size=spec.image_size, channels=spec.image_channels,
                                          background=m.get("image", {}).get("background", "#ffffff")))
    if images.train_labels is None:
        raise UsageError(f"data {source!r} has no labels to give")
    log(f"encoding {len(images.train)} training images with the bundle's encoder")
    with Generator.open(bundle) as gen:       # the runtime's checked encoder session
        _, codes = _encode(gen.encoder_session(), images.train)
    codes = blocks.split(codes[:, None].astype(np.int64), spec.blocks_per_side)[:, :, 0]
    code_dtype = "uint8" if spec.codebook_size <= 256 else "uint16"
    exact, flips = check_entries(bundle.array("codes.npy", code_dtype), codes)
    log(f"database checked: {exact} of {len(codes)} entries match exactly, the others differ in at most {flips} "
        f"of {codes[0].size} codes")
    members.pop("labels.npy", None)       # the new labels go last, as a new member would
    members["labels.npy"] = pack.npy(images.train_labels.astype(np.int64))
    manifest["dataset"] = {**m.get("dataset", {}), "labels": list(images.class_names)}
    pack.write(Path(out), manifest, database.with_entry_neighbours(manifest, members))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("data", help="the data source the bundle's database was built from, e.g. twemoji")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        manifest = relabel(args.bundle, args.data, args.out)
    except RissoleError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}: labels {', '.join(manifest['dataset']['labels'])}")


if __name__ == "__main__":
    main()

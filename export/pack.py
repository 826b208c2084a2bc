"""Writing a `.rissole` bundle atomically (the format is read by `rissole_edge.bundle`).

The bundle is assembled in a temporary file next to the target, with its magic written last
and only after everything else is on disk, then renamed over the target. A killed export
therefore leaves, at most, a hidden `.partial` file that does not start with the magic, and an
existing bundle at the target path is untouched until the final rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from rissole_edge import signing
from rissole_edge.bundle import ALIGN, FORMAT_VERSION, HEADER, MAGIC, Bundle, data_start


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def contents(bundle: Bundle) -> tuple[dict, dict[str, bytes]]:
    """A bundle's manifest, less the fields `write` sets itself, and all its members, after
    checking every checksum: what each bundle-to-bundle tool (graph rewrite, set-sampling,
    relabel, build-db, distilled export) edits before it writes the new bundle."""
    bundle.verify_all()
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("members", "format_version")}
    return manifest, {name: bundle.read(name) for name in bundle.members}


def write(path: Path, manifest: dict, members: dict[str, bytes], signing_key: bytes | None = None) -> None:
    """Write the bundle; with `signing_key` (a 32-byte Ed25519 secret) sign its manifest."""
    table, offset = {}, 0
    for name, data in members.items():
        table[name] = {"offset": offset, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        offset += -(-len(data) // ALIGN) * ALIGN
    manifest = {**manifest, "format_version": FORMAT_VERSION, "members": table}
    raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
    signer, signature = (signing.public_key(signing_key), signing.sign(signing_key, raw)) if signing_key \
        else (bytes(32), bytes(64))
    header = HEADER.pack(MAGIC, FORMAT_VERSION, len(raw), hashlib.sha256(raw).digest(), signer, signature)
    start = data_start(len(raw))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * len(MAGIC) + header[len(MAGIC):] + raw)
            for name, data in members.items():
                f.seek(start + table[name]["offset"])
                f.write(data)
            last = max(table.values(), key=lambda m: m["offset"])
            f.truncate(start + last["offset"] + last["size"])   # no padding after the last member
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            f.write(MAGIC)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""Hand-made bundles for reader tests."""

import hashlib
import json
import tempfile
from pathlib import Path

from rissole_edge.bundle import FORMAT_VERSION, HEADER, MAGIC, data_start


def bundle_with_members(members: dict, payload: bytes = b"") -> Path:
    raw = json.dumps({"members": members}).encode()
    header = HEADER.pack(MAGIC, FORMAT_VERSION, len(raw), hashlib.sha256(raw).digest(), bytes(32), bytes(64))
    body = header + raw
    body += b"\0" * (data_start(len(raw)) - len(body)) + payload
    path = Path(tempfile.mkdtemp()) / "hand.rissole"
    path.write_bytes(body)
    return path

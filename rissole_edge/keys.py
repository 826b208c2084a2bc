"""Key files for signed bundles: one line of text each, so they are easy to inspect and copy.

    KEY       rissole-ed25519-secret <64 hex digits>    (mode 0600)
    KEY.pub   rissole-ed25519-public <64 hex digits>
"""

from __future__ import annotations

import os
from pathlib import Path

from . import signing
from .errors import UsageError

SECRET, PUBLIC = "rissole-ed25519-secret", "rissole-ed25519-public"


def _read(path: Path, kind: str) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read key file {path}: {getattr(e, 'strerror', None) or e}") from None
    parts = text.split()
    if len(parts) != 2 or parts[0] != kind or len(parts[1]) != 64:
        raise UsageError(f"{path} is not a {kind} key file")
    try:
        return bytes.fromhex(parts[1])
    except ValueError:
        raise UsageError(f"{path} is not a {kind} key file") from None


def read_secret(path: Path) -> bytes:
    """A secret key for signing; raises ToolchainMissing at once, before any work that would end
    in a signature, when the signing library is not installed."""
    secret = _read(path, SECRET)
    signing.public_key(secret)
    return secret


def read_public(path: Path) -> bytes:
    return _read(path, PUBLIC)


def generate(path: Path) -> tuple[Path, Path]:
    """Write a new key pair to `path` (secret, 0600) and `path`.pub; refuses to overwrite."""
    path = Path(path)
    public_path = path.with_name(path.name + ".pub")
    for p in (path, public_path):
        if p.exists():
            raise UsageError(f"{p} exists: refusing to overwrite a key")
    secret = signing.new_secret()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{SECRET} {secret.hex()}\n")
        public_path.write_text(f"{PUBLIC} {signing.public_key(secret).hex()}\n")
    except OSError as e:
        raise UsageError(f"cannot write key file {path}: {e.strerror}") from None
    return path, public_path

"""Signing bundle manifests with Ed25519, through the `cryptography` package (export extra).

Only the build side imports this module (`keygen`, `export --sign`, `build-db --sign`): secret
keys belong to the constant-time, audited implementation in `cryptography`. Devices only
verify, with the dependency-free `rissole_edge.ed25519`, and never need this package.
"""

from __future__ import annotations

from types import ModuleType

from .errors import ToolchainMissing


def _ed25519() -> ModuleType:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ToolchainMissing("signing needs the toolchain (cryptography is missing): "
                               "pip install '.[export]' in a clone of rissole-edge") from None
    return ed25519


def new_secret() -> bytes:
    """A fresh 32-byte Ed25519 secret key."""
    return _ed25519().Ed25519PrivateKey.generate().private_bytes_raw()


def public_key(secret: bytes) -> bytes:
    """The 32-byte public key of a 32-byte secret key."""
    if len(secret) != 32:
        raise ValueError("an Ed25519 secret key is 32 bytes")
    return _ed25519().Ed25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def sign(secret: bytes, message: bytes) -> bytes:
    """The 64-byte signature of `message` (RFC 8032 Ed25519: deterministic)."""
    if len(secret) != 32:
        raise ValueError("an Ed25519 secret key is 32 bytes")
    return _ed25519().Ed25519PrivateKey.from_private_bytes(secret).sign(message)

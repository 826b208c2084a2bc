"""Signed bundles: Ed25519 over the manifest (signed with `cryptography`, verified by the runtime's
pure-Python verifier); trusted keys refuse unsigned or foreign bundles."""

import random
import sys

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rissole_edge import ed25519, keys, signing
from rissole_edge.bundle import Bundle, BundleError
from rissole_edge.errors import ToolchainMissing, UsageError
from rissole_export import pack

from conftest import cli

RFC8032 = [  # (secret, public, message, signature): RFC 8032 section 7.1, tests 1-3
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


@pytest.mark.parametrize("secret,public,message,signature", RFC8032)
def test_rfc8032_vectors_sign_and_verify(secret, public, message, signature):
    sk, pk, msg, sig = (bytes.fromhex(x) for x in (secret, public, message, signature))
    assert signing.public_key(sk) == pk
    assert signing.sign(sk, msg) == sig
    assert ed25519.verify(pk, msg, sig)
    bad = bytearray(sig)
    bad[5] ^= 1
    assert not ed25519.verify(pk, msg, bytes(bad))
    assert not ed25519.verify(pk, msg + b"x", sig)


def test_pure_python_verifier_agrees_with_cryptography():
    """The runtime's verifier accepts what `cryptography` signs and rejects, like `cryptography`,
    a one-bit change of the signature, the message or the key."""
    rng = random.Random(0)
    for _ in range(8):
        secret = Ed25519PrivateKey.generate()
        public = secret.public_key().public_bytes_raw()
        message = rng.randbytes(rng.randrange(1, 300))
        signature = secret.sign(message)
        assert ed25519.verify(public, message, signature)
        for field in range(3):
            parts = [bytearray(signature), bytearray(message), bytearray(public)]
            bit = rng.randrange(len(parts[field]) * 8)
            parts[field][bit // 8] ^= 1 << (bit % 8)
            sig, msg, pub = (bytes(p) for p in parts)
            assert not _cryptography_verifies(pub, msg, sig)
            assert not ed25519.verify(pub, msg, sig), (field, bit)


def _cryptography_verifies(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def test_signing_without_cryptography_is_one_line(tmp_path, monkeypatch):
    keys.generate(tmp_path / "key")
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric", None)
    with pytest.raises(ToolchainMissing, match=r"pip install '\.\[export\]'"):
        keys.read_secret(tmp_path / "key")
    with pytest.raises(ToolchainMissing):
        keys.generate(tmp_path / "other")
    assert keys.read_public(tmp_path / "key.pub")          # devices verify without it


def _resign(source, target, secret):
    b = Bundle.open(source)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("members", "format_version")}
    pack.write(target, manifest, {name: b.read(name) for name in b.members}, secret)


def test_signed_bundles_and_trusted_keys(tiny_bundle, tmp_path):
    secret_path, public_path = keys.generate(tmp_path / "key")
    other_secret, other_public = keys.generate(tmp_path / "other")
    with pytest.raises(UsageError, match="refusing to overwrite"):
        keys.generate(tmp_path / "key")
    assert oct(secret_path.stat().st_mode & 0o777) == "0o600"
    signed = tmp_path / "signed.rissole"
    _resign(tiny_bundle, signed, keys.read_secret(secret_path))
    trusted = [keys.read_public(public_path)]
    assert Bundle.open(signed, trusted).signer == trusted[0]
    assert Bundle.open(signed).signer == trusted[0]                 # without a key: unchanged behaviour
    with pytest.raises(BundleError, match="not trusted"):
        Bundle.open(signed, [keys.read_public(other_public)])
    with pytest.raises(BundleError, match="not signed"):
        Bundle.open(tiny_bundle, trusted)
    raw = bytearray(signed.read_bytes())
    raw[100] ^= 0x01                                                  # inside the signature slot
    (tmp_path / "forged.rissole").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="invalid signature"):
        Bundle.open(tmp_path / "forged.rissole")


def test_cli_keygen_sign_and_trust(tiny_run, tiny_bundle, tmp_path):
    cli("keygen", "-o", str(tmp_path / "k"), check=True)
    out = tmp_path / "s.rissole"
    cli("export", str(tiny_run), "-o", str(out), "--quantize", "fp32", "--sign", str(tmp_path / "k"), check=True)
    assert cli("verify", str(out), "--trusted-key", str(tmp_path / "k.pub")).returncode == 0
    proc = cli("generate", "-m", str(tiny_bundle), "--trusted-key", str(tmp_path / "k.pub"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "not signed" in proc.stderr and not (tmp_path / "o").exists()
    proc = cli("verify", str(out), "--trusted-key", str(tmp_path / "k"))          # a secret key is not a public key
    assert proc.returncode == 2 and "not a rissole-ed25519-public key file" in proc.stderr

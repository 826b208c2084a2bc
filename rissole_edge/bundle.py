"""Reading a `.rissole` bundle: one file with a checksummed JSON manifest and raw members.

Layout (docs/bundle-format.md has the full specification):

    0    8 bytes   magic b"RISSOLE\\0"
    8    u32 LE    format version
    12   u32 LE    manifest length L (bytes)
    16   32 bytes  sha256 of the manifest bytes
    48   32 bytes  Ed25519 public key of the signer (zeros: unsigned)
    80   64 bytes  Ed25519 signature of the manifest bytes (zeros: unsigned)
    144  L bytes   manifest, UTF-8 JSON
    D = 144 + L rounded up to 64: the data area; member m lies at D + offset(m), size(m) bytes

The reader trusts nothing: sizes are checked against the file before anything is read or
allocated, member names are plain file names, every member's sha256 is checked before it is
used, and nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import ed25519, sampler
from .errors import RissoleError, UsageError
from .schedule import SCHEDULES

try:    # CPython's own SHA-256: hashlib would load OpenSSL's libcrypto, 3.6 MB of RSS in every process
    from _sha2 import sha256                 # CPython >= 3.12
except ImportError:
    try:
        from _sha256 import sha256           # CPython 3.10, 3.11
    except ImportError:
        from hashlib import sha256

MAGIC = b"RISSOLE\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sII32s32s64s")    # magic, version, manifest length, sha256, signer, signature
ALIGN = 64
MAX_MANIFEST = 1 << 20
MEMBER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
REQUIRED = ("denoiser.onnx", "decoder.onnx", "codebook.npy", "codes.npy", "index.bin",
            "pca_mean.npy", "pca_components.npy")


class BundleError(RissoleError):
    """A bundle that is missing, damaged, from a newer version, or inconsistent."""


def data_start(manifest_length: int) -> int:
    return -(-(HEADER.size + manifest_length) // ALIGN) * ALIGN


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    size: int
    sha256: str


class Bundle:
    """An opened, structurally valid bundle. Members are read (and checksummed) on demand."""

    def __init__(self, path: Path, manifest: dict[str, Any], members: dict[str, Member], start: int,
                 memory: dict[str, bytes] | None = None, signer: bytes | None = None):
        self.path, self.manifest, self.members, self._start = path, manifest, members, start
        self._memory = memory
        self.signer = signer          # the public key that signed the manifest, if any

    @classmethod
    def in_memory(cls, manifest: dict[str, Any], data: dict[str, bytes]) -> "Bundle":
        """A bundle that lives only in memory (the exporter's parity check), so that no file
        that looks like a bundle exists before the real one is complete."""
        members = {name: Member(name, 0, len(d), sha256(d).hexdigest()) for name, d in data.items()}
        return cls(Path("<memory>"), manifest, members, 0, dict(data))

    @classmethod
    def open(cls, path: str | Path, trusted_keys: list[bytes] | None = None) -> "Bundle":
        """Open and check a bundle. With `trusted_keys`, it must be signed by one of them."""
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
                if len(head) < HEADER.size or not head.startswith(MAGIC):
                    raise BundleError(f"{path} is not a rissole bundle (bad magic)")
                _, version, length, digest, signer, signature = HEADER.unpack(head)
                if version > FORMAT_VERSION:
                    raise BundleError(f"{path} has bundle format {version}, newer than this rissole-edge "
                                      f"reads ({FORMAT_VERSION}): upgrade rissole-edge")
                if version < 1 or length > MAX_MANIFEST or HEADER.size + length > size:
                    raise BundleError(f"{path} is damaged: impossible manifest length {length}")
                raw = f.read(length)
        except FileNotFoundError:
            raise BundleError(f"bundle {path} not found") from None
        except IsADirectoryError:
            raise BundleError(f"{path} is a folder, not a bundle") from None
        except OSError as e:
            raise BundleError(f"cannot read bundle {path}: {e.strerror}") from None
        if sha256(raw).digest() != digest:
            raise BundleError(f"{path} is damaged: the manifest does not match its checksum")
        signed = any(signer) or any(signature)
        if signed and not ed25519.verify(signer, raw, signature):
            raise BundleError(f"{path} has an invalid signature: it was altered or is damaged")
        if trusted_keys is not None:
            if not signed:
                raise BundleError(f"{path} is not signed, and only signed bundles are trusted here")
            if signer not in trusted_keys:
                raise BundleError(f"{path} is signed by key {signer.hex()[:16]}..., which is not trusted here")
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BundleError(f"{path} is damaged: the manifest is not JSON") from None
        start = data_start(length)
        members = _check_members(path, manifest, size - start)
        return cls(path, manifest, members, start, signer=signer if signed else None)

    def read(self, name: str) -> bytes:
        """The bytes of one member, after checking its sha256."""
        m = self.members.get(name)
        if m is None:
            raise BundleError(f"{self.path} has no member {name!r}")
        if self._memory is not None:
            data = self._memory[name]
        else:
            with open(self.path, "rb") as f:
                f.seek(self._start + m.offset)
                data = f.read(m.size)
        if len(data) != m.size or sha256(data).hexdigest() != m.sha256:
            raise BundleError(f"{self.path} is damaged: member {name} does not match its checksum")
        return data

    def array(self, name: str, dtype: str | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A .npy member, loaded without pickle and checked against the expected dtype/shape."""
        data = self.read(name)
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, TokenError...
            raise BundleError(f"{self.path}: member {name} is not a valid array ({type(e).__name__})") from None
        if (dtype and arr.dtype != np.dtype(dtype)) or (shape and arr.shape != shape):
            raise BundleError(f"{self.path}: member {name} is {arr.dtype}{arr.shape}, "
                              f"the manifest says {dtype}{shape}")
        return arr

    def verify_all(self) -> None:
        for name in self.members:
            self.read(name)


def _check_members(path: Path, manifest: Any, data_size: int) -> dict[str, Member]:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("members"), dict):
        raise BundleError(f"{path} is damaged: the manifest has no member table")
    members: dict[str, Member] = {}
    end = 0
    for name, entry in manifest["members"].items():
        if not isinstance(name, str) or not MEMBER_NAME.fullmatch(name) or ".." in name:
            raise BundleError(f"{path} is damaged: unsafe member name {name!r}")
        if not isinstance(entry, dict):
            raise BundleError(f"{path} is damaged: member {name} has no entry")
        offset, size, digest = entry.get("offset"), entry.get("size"), entry.get("sha256")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, size)) \
                or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BundleError(f"{path} is damaged: member {name} has a malformed entry")
        members[name] = Member(name, offset, size, digest)
    spans = sorted((m.offset, m.size, m.name) for m in members.values())
    for offset, size, name in spans:       # packed in order: each member starts where padding ends
        if size < 0 or offset != -(-end // ALIGN) * ALIGN:
            raise BundleError(f"{path} is damaged: member {name} overlaps another or is misplaced")
        end = offset + size
    if end != data_size:
        raise BundleError(f"{path} is damaged or truncated: members end at {end} bytes, "
                          f"the data area holds {data_size}")
    missing = [n for n in REQUIRED if n not in members]
    if missing:
        raise BundleError(f"{path} is incomplete: missing {', '.join(missing)}")
    return members


def _field(manifest: dict, path: str, kind: type, low: float | None = None, high: float | None = None) -> Any:
    value: Any = manifest
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and low is not None and not low <= value <= high:
        ok = False
    if not ok:
        raise BundleError(f"bundle manifest field {path} is missing or out of range ({value!r})")
    return value


def _optional(manifest: dict, path: str, kind: type, default: Any, low: float | None = None,
              high: float | None = None) -> Any:
    """A field older bundles may lack: `default` when absent, checked like `_field` when present."""
    head, _, key = path.rpartition(".")
    node = manifest.get(head) if head else manifest
    if head and head in manifest and not isinstance(node, dict):
        raise BundleError(f"bundle manifest field {head} is not a table ({node!r})")
    if not isinstance(node, dict) or key not in node:
        return default
    return _field(manifest, path, kind, low, high)


MAX_GUIDANCE = 20.0
# ONNX metadata key of a denoiser whose rows only make sense together: with attention across
# blocks (manifest denoiser.cross_block) every item is a whole image of P rows.
ROWS_PER_ITEM = "rissole.rows_per_item"


def check_guidance(guidance: float, name: str = "guidance") -> None:
    """Refuse a guidance scale outside [0, MAX_GUIDANCE] (NaN too) in one line: every command
    that takes one (generate, evaluate, export, distill, set-sampling) says the same thing.
    `name`: how the message calls it (the option, where the user typed one)."""
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise UsageError(f"{name} must be between 0 and {MAX_GUIDANCE:g}, got {guidance}")


DEFAULT_SAMPLER = "ddim"      # what bundles that recommend no sampler or step count get
DEFAULT_STEPS = 50


@dataclass(frozen=True)
class Spec:
    """The manifest fields the runtime depends on, type- and range-checked once."""
    image_size: int
    image_channels: int
    latent_channels: int
    latent_side: int
    latent_scale: float
    codebook_size: int
    blocks_per_side: int
    block_side: int
    k: int
    window: int
    key: str
    key_dim: int
    ef: int
    images: int
    schedule: str
    timesteps: int
    beta_start: float
    beta_end: float
    labels: tuple[str, ...]
    block_bytes: int
    image_bytes: int
    guidance: float              # the exporter's recommended guidance scale (1 when it names none)
    sampler: str                 # the recommended sampler and step count (ddim, 50 when it names none)
    steps: int
    distilled_steps: int         # a distilled student's step count, the only one it runs (0: not distilled)
    border: int = 0              # w > 0: the denoiser also takes each block's window of its image's x_t (`window`)
    cross_block: bool = False    # the blocks of an image attend to each other inside the denoiser: whole images per call

    @property
    def positions(self) -> int:
        return self.blocks_per_side ** 2

    @property
    def window_side(self) -> int:
        """Side of a border-conditioned denoiser's `window` input: the block and w rows each way."""
        return self.block_side + 2 * self.border

    @property
    def row_bytes(self) -> int:
        """Bytes one denoiser row costs the memory planner: the exporter's count of every value
        the graph computes per row (`memory.block_bytes`, the `window` input included) and, for
        a border-conditioned denoiser, the runtime's gather beside it (the image's padded latent
        and the windows cut from it before guidance copies them: two windows' bytes per row)."""
        return self.block_bytes + (2 * 4 * self.latent_channels * self.window_side ** 2 if self.border else 0)

    @property
    def blocks_together(self) -> int:
        """Blocks that must share a denoiser call: all P of an image, in position order, when each
        block's window is cut from its neighbours' current x_t (border > 0) or when the blocks
        attend to each other inside the graph (cross_block); else 1."""
        return self.positions if self.border or self.cross_block else 1

    @property
    def rows_per_item(self) -> int:
        """Rows the denoiser graph only takes together (its ROWS_PER_ITEM): P with attention
        across blocks, else 1. Any call, a timing probe's too, holds a multiple of it."""
        return self.positions if self.cross_block else 1

    def whole_items(self, rows: int) -> int:
        """`rows` rounded up to whole items of the graph."""
        return -(-rows // self.rows_per_item) * self.rows_per_item

    @classmethod
    def from_manifest(cls, m: dict) -> "Spec":
        spec = cls(
            image_size=_field(m, "image.size", int, 4, 4096),
            image_channels=_field(m, "image.channels", int, 1, 4),
            latent_channels=_field(m, "latent.channels", int, 1, 64),
            latent_side=_field(m, "latent.side", int, 1, 1024),
            latent_scale=_field(m, "latent.scale", float, 1e-6, 1e6),
            codebook_size=_field(m, "latent.codebook_size", int, 2, 65536),
            blocks_per_side=_field(m, "blocks.per_side", int, 1, 64),
            block_side=_field(m, "blocks.side", int, 1, 1024),
            k=_field(m, "retrieval.k", int, 0, 64),
            window=_field(m, "retrieval.window", int, 0, 1024),
            key=_field(m, "retrieval.key", str),
            key_dim=_field(m, "retrieval.key_dim", int, 1, 65536),
            ef=_field(m, "retrieval.ef", int, 1, 100000),
            images=_field(m, "retrieval.images", int, 1, 100_000_000),
            schedule=_field(m, "schedule.kind", str),
            timesteps=_field(m, "schedule.timesteps", int, 1, 100000),
            beta_start=_field(m, "schedule.beta_start", float, 1e-8, 0.5),
            beta_end=_field(m, "schedule.beta_end", float, 1e-8, 0.999),
            labels=tuple(_field(m, "dataset.labels", list)),
            block_bytes=_field(m, "memory.block_bytes", int, 1, 1 << 34),
            image_bytes=_field(m, "memory.image_bytes", int, 1, 1 << 34),
            guidance=_optional(m, "sampling.guidance", float, 1.0, 0, MAX_GUIDANCE),
            sampler=_optional(m, "sampling.sampler", str, DEFAULT_SAMPLER),
            steps=_optional(m, "sampling.steps", int, DEFAULT_STEPS, 1, 100000),
            distilled_steps=_optional(m, "sampling.distilled_steps", int, 0, 0, 100000),
            border=_optional(m, "denoiser.border", int, 0, 0, 1024),
            cross_block=_optional(m, "denoiser.cross_block", bool, False),
        )
        if spec.border > spec.block_side or (spec.border and spec.blocks_per_side == 1):
            raise BundleError(f"bundle manifest field denoiser.border is {spec.border}: it must be 0, or at most "
                              f"the block side ({spec.block_side}) with more than one block per side")
        if spec.cross_block and spec.blocks_per_side == 1:
            raise BundleError("bundle manifest field denoiser.cross_block is true for a model with one block")
        if spec.distilled_steps and (spec.steps, spec.sampler) != (spec.distilled_steps, "ddim"):
            raise BundleError(f"bundle manifest field sampling.distilled_steps ({spec.distilled_steps}) "
                              f"disagrees with sampling.steps/sampler ({spec.steps} {spec.sampler})")
        if spec.sampler not in sampler.SAMPLERS:
            raise BundleError(f"bundle manifest field sampling.sampler is {spec.sampler!r}, "
                              f"not a sampler this rissole-edge has ({sampler.names()}): upgrade rissole-edge")
        if spec.steps > spec.timesteps:
            raise BundleError(f"bundle manifest field sampling.steps is {spec.steps}, more than the schedule's "
                              f"{spec.timesteps} timesteps")
        key_ok = spec.key == "latent" or (re.fullmatch(r"block:[0-9]{1,4}", spec.key) is not None
                                          and int(spec.key[6:]) < spec.positions)
        if not key_ok or spec.block_side * spec.blocks_per_side != spec.latent_side or spec.window < spec.k \
                or not all(isinstance(x, str) for x in spec.labels) or spec.schedule not in SCHEDULES:
            raise BundleError("bundle manifest geometry is inconsistent")
        return spec

"""Mutations of a valid bundle, for the fuzz tests and the long fuzz run (benchmarks/fuzz.py).

Every mutation returns bytes of a would-be bundle. "Deep" mutations change a member and then
repair its sha256 and the manifest checksum, so that they reach the parsers behind the
checksums (npy, ONNX, hnswlib index, manifest fields) instead of stopping at the first check.
"""

from __future__ import annotations

import hashlib
import json
import random

from rissole_edge.bundle import HEADER, MAGIC, Bundle, data_start

FIELDS = ["image.size", "image.channels", "latent.channels", "latent.side", "latent.scale",
          "latent.codebook_size", "blocks.per_side", "blocks.side", "retrieval.k", "retrieval.window",
          "retrieval.key", "retrieval.key_dim", "retrieval.ef", "retrieval.images", "schedule.kind",
          "schedule.timesteps", "schedule.beta_start", "schedule.beta_end", "dataset.labels",
          "memory.block_bytes", "memory.image_bytes", "image.background", "sampling.guidance",
          "sampling.sampler", "sampling.steps", "sampling", "members"]
VALUES = [None, -1, 0, 1, 2 ** 31, 2 ** 62, -(2 ** 63), 1.5, float("nan"), "x", "", [], {}, [1, 2], True,
          "../../etc/passwd", 10 ** 30, "block:x", "block:99", "block:1"]


def _parts(raw: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(raw[12:16], "little")
    manifest = json.loads(raw[HEADER.size:HEADER.size + length])
    return manifest, raw[data_start(length):]


def _assemble(manifest: dict, data: bytes) -> bytes:
    text = json.dumps(manifest).encode()
    header = HEADER.pack(MAGIC, 1, len(text), hashlib.sha256(text).digest(), bytes(32), bytes(64))
    body = header + text
    return body + b"\0" * (data_start(len(text)) - len(body)) + data


def truncate(raw: bytes, rng: random.Random) -> bytes:
    return raw[:rng.randrange(len(raw))]


def flip_bit(raw: bytes, rng: random.Random) -> bytes:
    out = bytearray(raw)
    i = rng.randrange(len(out))
    out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_field(raw: bytes, rng: random.Random) -> bytes:
    manifest, data = _parts(raw)
    path = rng.choice(FIELDS).split(".")
    node = manifest
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        node[path[-1]] = rng.choice(VALUES)
    return _assemble(manifest, data)


def edit_members(raw: bytes, rng: random.Random) -> bytes:
    manifest, data = _parts(raw)
    members = manifest["members"]
    name = rng.choice(sorted(members))
    action = rng.randrange(5)
    if action == 0:
        del members[name]
    elif action == 1:
        members[rng.choice(["../escape", "/etc/passwd", "a/b", "..", "x" * 300, "extra.bin"])] = dict(members[name])
    elif action == 2:
        members[name]["offset"] = rng.choice([-64, 1, 2 ** 62, members[name]["offset"] + 64])
    elif action == 3:
        members[name]["size"] = rng.choice([-1, 0, 2 ** 62, members[name]["size"] + 1])
    else:
        members[name] = rng.choice(VALUES)
    return _assemble(manifest, data)


def _replace_content(manifest: dict, data: bytes, name: str, content: bytes) -> bytes:
    """The bundle with member `name` (same size) replaced and every checksum agreeing with it."""
    entry = manifest["members"][name]
    data = data[:entry["offset"]] + content + data[entry["offset"] + entry["size"]:]
    entry["sha256"] = hashlib.sha256(content).hexdigest()
    return _assemble(manifest, data)


def deep_member(raw: bytes, rng: random.Random) -> bytes:
    """Damage one member's content, then make every checksum agree with the damage."""
    manifest, data = _parts(raw)
    name = rng.choice(sorted(manifest["members"]))
    entry = manifest["members"][name]
    content = bytearray(data[entry["offset"]:entry["offset"] + entry["size"]])
    for _ in range(rng.randint(1, 8)):
        if content:
            content[rng.randrange(len(content))] = rng.randrange(256)
    return _replace_content(manifest, data, name, bytes(content))


def entry_lists(raw: bytes, rng: random.Random) -> bytes:
    """Damage entry_neighbours.npy where its checks look (checksums repaired): one id set to
    any value (past the database, the filler: a gap, or another entry) in the any-label row of
    an entry. A bundle without the member gets `deep_member` instead."""
    manifest, data = _parts(raw)
    entry = manifest["members"].get("entry_neighbours.npy")
    if entry is None:
        return deep_member(raw, rng)
    images, window = manifest["retrieval"]["images"], manifest["retrieval"]["window"]
    item = 2 if images < 0xFFFF else 4
    content = bytearray(data[entry["offset"]:entry["offset"] + entry["size"]])
    start = len(content) - images * 2 * window * item            # the .npy data follows its header
    at = start + (rng.randrange(images) * 2 * window + rng.randrange(window)) * item
    value = rng.choice([images, images + 1, (1 << 8 * item) - 1, rng.randrange(images)])
    content[at:at + item] = value.to_bytes(item, "little")
    return _replace_content(manifest, data, "entry_neighbours.npy", bytes(content))


MUTATIONS = [truncate, flip_bit, set_field, edit_members, deep_member, entry_lists]


def mutate(raw: bytes, seed: int) -> tuple[str, bytes]:
    rng = random.Random(seed)
    mutation = rng.choice(MUTATIONS)
    return mutation.__name__, mutation(raw, rng)


def check_case(path) -> str:
    """Open the bundle and generate one image: "ok" or the RissoleError's class name.
    Anything else propagates: that is a finding."""
    from PIL import Image

    from rissole_edge.errors import RissoleError
    from rissole_edge.generator import Generator, Query
    try:
        Bundle.open(path).verify_all()
        with Generator.open(path, threads=1) as gen:
            gen.generate(1, seed=0, steps=2, as_array=True)
            if "encoder.onnx" in gen.bundle.members and gen.spec.k:
                gen.generate(1, seed=0, steps=1, query=Query(like=Image.new("L", (20, 20), 128)), as_array=True)
        return "ok"
    except RissoleError as e:
        return type(e).__name__

"""Helpers for bundle tests: hand-made bundles for the reader, and checks that a bundle
whose denoiser needs whole images per call (border windows, attention across blocks) samples
what the torch sampler does and keeps an image whole under the tightest memory budget."""

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from rissole_edge import budget
from rissole_edge.bundle import FORMAT_VERSION, HEADER, MAGIC, Bundle, data_start
from rissole_edge.generator import Generator, Query
from rissole_edge.images import to_uint8
from rissole_export.denoiser import UNet
from rissole_export.diffusion import Diffusion
from rissole_export.sampling import generate_latents


def bundle_with_members(members: dict, payload: bytes = b"") -> Path:
    raw = json.dumps({"members": members}).encode()
    header = HEADER.pack(MAGIC, FORMAT_VERSION, len(raw), hashlib.sha256(raw).digest(), bytes(32), bytes(64))
    body = header + raw
    body += b"\0" * (data_start(len(raw)) - len(body)) + payload
    path = Path(tempfile.mkdtemp()) / "hand.rissole"
    path.write_bytes(body)
    return path


def check_runtime_matches_torch(bundle: Bundle, net: UNet) -> None:
    """Images of three queries (3 DDIM steps, guidance 2), one generate call each, from the
    runtime and from the torch sampler with the same fp32 network, noise and neighbours, agree
    to float rounding (ORT vs torch); two queries give different images."""
    entries, seed = [3, 11, 3], 5
    with Generator.open(bundle, threads=1) as gen:
        spec = gen.spec
        got = np.concatenate([gen.generate(1, seed=seed, first_index=i, steps=3, sampler_name="ddim", guidance=2.0,
                                           query=Query(entry=q), as_array=True) for i, q in enumerate(entries)])
        neighbours = np.zeros((spec.images, spec.window), np.int64)
        for q in set(entries):
            neighbours[q] = gen.db.entry_candidates(q)
        latents = torch.from_numpy(gen.db.blocks(np.arange(spec.images)))
        with torch.no_grad():
            z = generate_latents(net, latents, neighbours, Diffusion(spec.schedule, spec.timesteps), entries, seed,
                                 3, "ddim", 2.0)
        want = to_uint8(gen.decoder.run(["image"], {"latent": z.astype(np.float32)})[0])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert not np.array_equal(got[0], got[1])


def check_one_image_budget(bundle: Bundle, monkeypatch) -> None:
    """The tightest memory budget calls the denoiser on one whole image at a time and generates
    what an unbounded run does."""
    monkeypatch.setattr(budget, "rss", lambda: (0, 0))     # plan from the model of the bytes, not this process
    with Generator.open(bundle, threads=1) as free:
        want = free.generate(3, seed=2, steps=3, as_array=True)
        tight = budget.minimum(free.spec, budget.fixed(bundle))
    with Generator.open(bundle, threads=1, memory_budget=tight) as gen:
        assert gen.plan.blocks_per_call == gen.spec.positions
        assert np.array_equal(gen.generate(3, seed=2, steps=3, as_array=True), want)


def check_alone_batched_and_threaded(bundle: Bundle, guidance: float) -> None:
    """Image 3 of a batch of 5 is the image generated alone, and two threads give the batch too."""
    with Generator.open(bundle, threads=1) as one, Generator.open(bundle, threads=2) as two:
        batch = one.generate(5, seed=9, steps=4, guidance=guidance, as_array=True)
        alone = one.generate(1, seed=9, steps=4, guidance=guidance, first_index=3, as_array=True)
        assert np.array_equal(batch[3], alone[0])
        assert np.array_equal(two.generate(5, seed=9, steps=4, guidance=guidance, as_array=True), batch)

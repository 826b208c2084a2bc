"""The sampling a bundle recommends: the manifest's `sampling` table, written by the exporter
and re-written on an existing bundle by `rissole-edge set-sampling`.

`generate` uses the recommended sampler, step count and guidance unless told otherwise, so
the people who measured a model (benchmarks/steps.py) can ship what they measured without
retraining or re-exporting it: re-packing keeps every member byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from rissole_edge import sampler
from rissole_edge.bundle import Bundle, Spec, check_guidance
from rissole_edge.errors import UsageError

from . import pack


def sampling_fields(name: str, steps: int, guidance: float, timesteps: int) -> dict:
    """The manifest's `sampling` table, after the checks `Spec.from_manifest` will make."""
    if name not in sampler.SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose {sampler.names()}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= timesteps:
        raise UsageError(f"steps must be between 1 and {timesteps}, got {steps}")
    check_guidance(guidance)
    return {"sampler": name, "steps": int(steps), "guidance": float(guidance)}


def set_sampling(bundle_path: Path, out: Path, name: str | None = None, steps: int | None = None,
                 guidance: float | None = None, signing_key: bytes | None = None, log=print) -> dict:
    """Write `out`: the bundle at `bundle_path` with new recommended sampling fields (None keeps
    the bundle's current value). `out` may be the bundle itself: the new file replaces it
    atomically. Returns the new manifest's sampling table."""
    source = Bundle.open(bundle_path)
    manifest, members = pack.contents(source)
    spec = Spec.from_manifest(source.manifest)
    fields = sampling_fields(spec.sampler if name is None else name, spec.steps if steps is None else steps,
                             spec.guidance if guidance is None else guidance, spec.timesteps)
    manifest["sampling"] = {**manifest.get("sampling", {}), **fields}
    if source.signer is not None and signing_key is None:
        log(f"note: {bundle_path} was signed; the new manifest is unsigned (pass --sign KEY to sign it)")
    pack.write(Path(out), manifest, members, signing_key)
    return manifest["sampling"]

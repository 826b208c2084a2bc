"""The `rissole-edge` command line.

Runtime commands import only the runtime; toolchain commands (train, ...) import torch lazily
inside the command, so a runtime-only install starts fast and says how to get the toolchain.
Every user error ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import sampler as _samplers
from .errors import RissoleError, ToolchainMissing
from .shipped import help_text as _bundle_help

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="On-device image generation with a retrieval-guided block diffusion model.")


def _toolchain():
    """Import the toolchain, or explain in one line how to install it."""
    try:
        import torch  # noqa: F401
        import rissole_export
    except ImportError as e:
        raise ToolchainMissing(f"this command needs the toolchain ({e.name} is missing): "
                               "pip install '.[export]' in a clone of rissole-edge") from None
    return rissole_export


@app.callback()
def _root() -> None:
    """On-device image generation with a retrieval-guided block diffusion model."""


@app.command()
def train(
    data: str = typer.Argument(..., help="An image folder (sub-folders = classes), 'fashion-mnist' or 'twemoji'."),
    out: Path = typer.Option(..., "--out", help="Run directory: config, checkpoints, database, metrics, samples."),
    preset: Optional[str] = typer.Option(None, help="tiny | small | base (default: small for a new run, the run's own config for an existing one)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON overrides of the preset (with --resume: of the run's own config, where only the denoiser's steps and learning-rate schedule may change)."),
    stage: str = typer.Option("all", help="autoencoder | database | denoiser | all."),
    max_minutes: Optional[float] = typer.Option(None, help="Checkpoint and stop after this many minutes."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    reuse: Optional[Path] = typer.Option(None, "--reuse", help="Start from this finished run's autoencoder and database (same data, autoencoder and database settings): for denoiser variants."),
    size: Optional[int] = typer.Option(None, "--size", help="Image side in pixels (data.size; default 32, 64 for twemoji): every image is fitted to it (data.fit)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout (progress and the estimate stay on stderr)."),
) -> None:
    """Train a run: VQ autoencoder -> neighbour database -> block denoiser (toolchain extra).

    Prints an estimate of the whole run before it starts, then per-stage progress with an ETA
    (log lines when piped)."""
    _toolchain()
    from rissole_export.train import train as run_training

    summary = run_training(data, out, preset, config_file, stage, max_minutes, resume, reuse=reuse, size=size,
                           log=lambda msg: typer.echo(msg, err=True))
    typer.echo(json.dumps(summary, indent=2) if json_out else "\n".join(_flat_lines(summary)))
    if summary.get("interrupted"):
        raise typer.Exit(130)


@app.command()
def distill(
    teacher: Path = typer.Argument(..., help="A training run directory, or a .rissole bundle (with the --preset/--config it was trained with; models/NAME.toml beside models/NAME.rissole is found by itself)."),
    steps: int = typer.Option(..., "--steps", help="Sampling steps the student is made for (e.g. 2, 4 or 8); its bundle refuses others."),
    out: Path = typer.Option(..., "--out", help="Student run directory; 'rissole-edge export' makes it a bundle."),
    teacher_steps: Optional[int] = typer.Option(None, help="The teacher's DDIM run that gives the targets (default 50)."),
    train_steps: Optional[int] = typer.Option(None, help="Student optimizer steps (default 4000; may be lowered on --resume to finish early)."),
    batch_size: Optional[int] = typer.Option(None, help="Blocks per step (default 128)."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (default 1e-4)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Teacher guidance folded into the student (default: the bundle's recorded scale; 1 for a run)."),
    preset: Optional[str] = typer.Option(None, help="A bundle teacher's preset (default: small)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A bundle teacher's config overrides (TOML or JSON)."),
    max_minutes: Optional[float] = typer.Option(None, help="Checkpoint and stop after this many minutes."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Distil a run's or a bundle's denoiser into a few-step student (toolchain extra)."""
    _toolchain()
    from rissole_export.distill import distill as run_distill

    summary = run_distill(teacher, steps, out, preset, config_file, max_minutes, resume, progress=not json_out,
                          teacher_steps=teacher_steps, train_steps=train_steps, batch_size=batch_size, lr=lr,
                          guidance=guidance)
    typer.echo(json.dumps(summary, indent=2) if json_out else "\n".join(_flat_lines(summary)))
    if summary.get("interrupted"):
        raise typer.Exit(130)


def _flat_lines(summary: dict, prefix: str = "") -> list[str]:
    """A nested summary as `key.sub: value` lines: readable, greppable, no Python reprs."""
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            lines += _flat_lines(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            lines.append(f"{prefix}{key}: {value:.4g}")
        else:
            lines.append(f"{prefix}{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    return lines


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, "-m", "--model", help=_bundle_help() + " Default: the first."),
    n: int = typer.Option(4, "-n", help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Same bundle, seed and settings -> same images."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps, i.e. denoiser calls per block (1 to the schedule's T; default: the bundle's recommended count, see info, else 50)."),
    sampler_name: Optional[str] = typer.Option(None, "--sampler", help=f"{_samplers.describe()}. Default: the bundle's recommended sampler (see info), else ddim."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Neighbour guidance scale (1 = plain conditioning; default: the bundle's recommended scale, see info)."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Peak RSS limit, e.g. 160MB (refused, with the minimum, if too small)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Worker threads for the denoiser (default: the plan's choice: one per core when the work per call pays for it, else one)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder for the PNGs (seedS-NNNN.png), written group by group (default: a new generated/NNN per run)."),
    grid_file: Optional[Path] = typer.Option(None, "--grid", help="Also write all images as one grid PNG."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing PNGs of the same names (default: refuse before any work)."),
    like: Optional[Path] = typer.Option(None, "--like", help="Generate images like this one (retrieval by image)."),
    query_id: Optional[int] = typer.Option(None, "--query-id", help="Condition on this database entry's neighbours."),
    label: Optional[str] = typer.Option(None, "--label", help="Only neighbours of this class (bundles with labels)."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Rewrite this PNG with a grid of where the images are heading (decoded x0 predictions) as sampling goes."),
    preview_every: Optional[int] = typer.Option(None, "--preview-every", help="Steps between previews (default: about ten per run)."),
    force_steps: bool = typer.Option(False, "--force-steps", help="Run a distilled bundle at other steps/sampler/guidance than it was made for (see info)."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written and the timings as JSON."),
    trusted_key: Optional[list[Path]] = typer.Option(None, "--trusted-key", help="Only accept bundles signed by this public key (repeatable)."),
) -> None:
    """Generate images block by block (onnxruntime + numpy + hnswlib; no torch)."""
    import time

    from . import budget
    from .errors import UsageError
    from .generator import Generator, Query, check_count
    from .output import ImageWriter
    from .preview import grid_file as preview_grid
    from .progress import Progress

    if sum(x is not None for x in (like, query_id, label)) > 1:
        raise UsageError("choose at most one of --like, --query-id and --label")
    check_count(n)
    writer = ImageWriter(out, seed, grid_file)
    writer.check(n, overwrite)
    on_preview = preview_grid(preview) if preview is not None else None
    t0 = time.perf_counter()
    with Generator.open(model, memory_budget=memory_budget, threads=threads,
                        trusted_keys=_trusted(trusted_key)) as gen:
        t_open = time.perf_counter() - t0
        bar = Progress(n, "images", enabled=None if not json_out else False)
        t1 = time.perf_counter()
        try:
            pictures = gen.generate(n, seed=seed, steps=steps, sampler_name=sampler_name, guidance=guidance,
                                    query=Query(entry=query_id, like=like, label=label),
                                    on_group=writer.write_group, on_progress=lambda done, _n: bar.update(done),
                                    on_preview=on_preview, preview_every=preview_every, force_steps=force_steps,
                                    as_array=True, collect=grid_file is not None)   # else only as PNGs are written
        except KeyboardInterrupt:
            bar.close()
            typer.echo(f"interrupted: {writer.summary()}", err=True)
            raise typer.Exit(130)
        bar.close()
        t_gen = time.perf_counter() - t1
        plan = gen.plan.describe()
    if pictures is not None:
        writer.write_grid(pictures)
    written = writer.written
    _, peak = budget.rss()
    report = {"images": [str(p) for p in written], "grid": str(grid_file) if grid_file else None,
              "open_s": round(t_open, 4), "generate_s": round(t_gen, 4), "per_image_s": round(t_gen / n, 5),
              "plan": plan, "peak_rss_mb": round(peak / 2 ** 20, 1)}
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(f"wrote {len(written)} images to {writer.folder}" + (f" and {grid_file}" if grid_file else "")
                   + f" in {t_gen:.2f} s ({plan}; peak RSS {report['peak_rss_mb']} MB)")


def _trusted(paths: Optional[list[Path]]) -> Optional[list[bytes]]:
    from .keys import read_public

    return [read_public(p) for p in paths] if paths else None


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "-m", "--model", help=_bundle_help() + " Default: the first."),
    quick: bool = typer.Option(False, "--quick", help="Seconds, not minutes: 5 steps, 2 images, fewer sizes, no budget run."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Measure cold and warm latency, batched throughput and peak RSS, and the thread plans against their options."""
    from .bench import bench as run_bench
    from .bench import lines
    from .bundle import Bundle
    from .shipped import resolve

    path = resolve(model)
    Bundle.open(path)                      # a bad bundle fails here, in one line
    results = run_bench(path, quick)
    typer.echo(json.dumps(results, indent=2) if json_out else "\n".join(lines(results)))


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="A complete training run directory."),
    output: Path = typer.Option(..., "-o", "--output", help="The bundle to write, e.g. fashion.rissole."),
    quantize: str = typer.Option("int8", help="int8 (static, per-channel, Conv only) or fp32."),
    target: str = typer.Option("x86", help="Quantization preset: x86 (AVX2/AVX-512 VNNI) or arm64."),
    calibration_samples: int = typer.Option(32, help="Images whose sampling trajectories calibrate int8."),
    db_limit: Optional[int] = typer.Option(None, help="Keep only this many database images (a seeded sample)."),
    guidance: float = typer.Option(1.0, "--guidance", help="Guidance scale the bundle recommends; generate uses it unless told otherwise."),
    sampler_name: str = typer.Option("ddim", "--sampler", help="Sampler the bundle recommends (generate's default for it): " + _samplers.names() + "."),
    sampling_steps: int = typer.Option(50, "--steps", help="Step count the bundle recommends (measure it: benchmarks/steps.py)."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign the manifest with this secret key (see keygen)."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Export a run to one bundle: int8 ONNX denoiser/decoder, encoder, HNSW index, neighbour blocks."""
    from .keys import read_secret

    signing_key = read_secret(sign) if sign else None
    _toolchain()
    from rissole_export.exporter import export

    manifest = export(run, output, quantize, target, calibration_samples, db_limit, guidance=guidance,
                      sampler=sampler_name, sampling_steps=sampling_steps,
                      log=(lambda msg: None) if json_out else (lambda msg: typer.echo(msg, err=True)),
                      signing_key=signing_key)
    if json_out:
        typer.echo(json.dumps({k: v for k, v in manifest.items() if k != "members"}, indent=2))
    else:
        typer.echo(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
        for key, value in manifest.get("parity", {}).items():
            typer.echo(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    advice = _int8_advice(manifest.get("parity", {}))
    if advice:
        typer.echo(f"warning: {advice}", err=True)


INT8_MIN_PSNR_DB = 25.0     # the shipped bundles measure 33.8 and 37.1 dB mean against fp32


def _int8_advice(parity: dict) -> Optional[str]:
    """An int8 bundle that is far from its fp32 model, or no faster, deserves a word: a barely
    trained run's activations calibrate badly, and then fp32 is the better bundle."""
    psnr, speedup = parity.get("int8_vs_fp32_psnr_mean"), parity.get("int8_speedup")
    if psnr is None or speedup is None:
        return None
    problems = ([f"its images are {psnr:.1f} dB from fp32's (shipped bundles: 34-37 dB)"] if psnr < INT8_MIN_PSNR_DB else []) \
        + ([f"its denoiser ran {speedup:.2f}x as fast as fp32 here"] if speedup < 1.0 else [])
    if not problems:
        return None
    return (f"the int8 bundle is a poor trade: {' and '.join(problems)}; export again with --quantize fp32 "
            "(common after a short training run), or train longer")


@app.command("set-sampling")
def set_sampling_cmd(
    bundle: Path = typer.Argument(..., help="The bundle whose recommended sampling changes."),
    output: Path = typer.Option(..., "-o", "--output", help="The new bundle (may be BUNDLE itself: replaced atomically)."),
    sampler_name: Optional[str] = typer.Option(None, "--sampler", help="Recommended sampler: " + _samplers.names() + " (default: keep)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Recommended step count (default: keep)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Recommended guidance scale (default: keep)."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign the new manifest with this secret key."),
) -> None:
    """Re-pack a bundle with a new recommended sampler/steps/guidance; every member stays byte for byte."""
    from .keys import read_secret

    signing_key = read_secret(sign) if sign else None
    _toolchain()
    from rissole_export.recommend import set_sampling

    fields = set_sampling(bundle, output, sampler_name, steps, guidance, signing_key,
                          log=lambda msg: typer.echo(msg, err=True))
    typer.echo(f"wrote {output}: {fields['sampler']}, {fields['steps']} steps, guidance {fields['guidance']:g} by default")


@app.command("build-db")
def build_db_cmd(
    bundle: Path = typer.Argument(..., help="The bundle whose models are kept."),
    images: Path = typer.Argument(..., help="Folder of images for the new database (sub-folders = labels)."),
    output: Path = typer.Option(..., "-o", "--output", help="The new bundle."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign the new manifest with this secret key."),
) -> None:
    """Rebuild a bundle's neighbour database from another image folder, without retraining."""
    from .keys import read_secret

    signing_key = read_secret(sign) if sign else None
    _toolchain()
    from rissole_export.rebuild import build_db

    manifest = build_db(bundle, images, output, log=lambda msg: typer.echo(msg, err=True), signing_key=signing_key)
    r = manifest["retrieval"]
    typer.echo(f"wrote {output}: {r['images']} images, ef={r['ef']}, recall@{r['window'] + 1}={r['recall']:.3f}")


@app.command()
def evaluate(
    target: Path = typer.Argument(..., help="A bundle or a training run directory."),
    n: int = typer.Option(5000, "-n", help="Images to generate and compare."),
    reference: str = typer.Option("test", help="Reference split: test or train."),
    data: Optional[str] = typer.Option(None, "--data", help="The data a bundle was made from, if not fashion-mnist/twemoji."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM sampling steps (not the bundle's recommended sampler, so that runs and bundles compare; default 50, or a distilled bundle's own count)."),
    seed: int = typer.Option(0, "--seed"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Neighbour guidance scale (default: a bundle's recommended scale; 1 for a run, which records none)."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Measure quality: FD/KID on EfficientNet-Lite0 features, seam ratio, copying, block agreement, block coherence, label accuracy."""
    _toolchain()
    from rissole_export.evaluate import evaluate as run_evaluation

    metrics = run_evaluation(target, n, reference, data, steps, seed, guidance,
                             log=(lambda msg: None) if json_out else (lambda msg: typer.echo(msg, err=True)))
    typer.echo(json.dumps(metrics, indent=2) if json_out else "\n".join(_flat_lines(metrics)))


@app.command()
def keygen(output: Path = typer.Option(..., "-o", "--output", help="Secret key file; the public key goes to OUTPUT.pub.")) -> None:
    """Make an Ed25519 key pair for signing bundles (export --sign, generate --trusted-key)."""
    from .keys import generate as make_keys

    secret, public = make_keys(output)
    typer.echo(f"wrote {secret} (secret, keep it private) and {public} (give this to devices)")


@app.command()
def info(
    bundle: str = typer.Argument(..., help=_bundle_help()),
    json_out: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Describe a bundle: geometry, database, quantization, parity, members."""
    from .bundle import Bundle, Spec
    from .shipped import resolve

    b = Bundle.open(resolve(bundle))
    m = b.manifest
    if json_out:
        typer.echo(json.dumps(m, indent=2))
        return
    spec = Spec.from_manifest(m)
    q = m.get("quantization", {})
    lines = [
        f"{bundle}: rissole bundle v{m.get('format_version')} made by rissole-edge {m.get('tool_version')}",
        f"  images      {spec.image_size}x{spec.image_size}x{spec.image_channels}, "
        f"latent {spec.latent_channels}x{spec.latent_side}x{spec.latent_side}, "
        f"{spec.blocks_per_side}x{spec.blocks_per_side} blocks of {spec.block_side}",
        f"  denoiser    {m.get('denoiser', {}).get('kind')}, {m.get('parameters', {}).get('denoiser')} parameters, "
        f"{q.get('mode')} {q.get('target', '')}"
        + (f", border {spec.border} (each block sees the {spec.border} latent rows/columns of its neighbours "
           "that touch it)" if spec.border else "")
        + (", attention across the blocks of an image" if spec.cross_block else ""),
        f"  database    {spec.images} images, k={spec.k} of the nearest {spec.window}, key {spec.key} "
        f"({spec.key_dim}-d), ef={spec.ef}",
        f"  sampling    {spec.sampler}, {spec.steps} steps, guidance {spec.guidance:g} by default"
        + ("" if "steps" in m.get("sampling", {}) else " (the bundle recommends no step count)"),
        *([f"  distilled   a {spec.distilled_steps}-step student of {m.get('distilled', {}).get('teacher')}: "
           "other steps, samplers and guidance are refused without --force-steps"] if spec.distilled_steps else []),
        f"  dataset     {m.get('dataset', {}).get('name')} ({m.get('dataset', {}).get('licence')})"
        + (f", labels: {', '.join(spec.labels)}" if spec.labels else ""),
    ]
    lines.append(f"  signed by   {b.signer.hex()}" if b.signer else "  signed by   nobody (unsigned)")
    for key, value in m.get("parity", {}).items():
        lines.append(f"  parity      {key} = {value:.4g}" if isinstance(value, float) else f"  parity      {key} = {value}")
    for name, member in b.members.items():
        lines.append(f"  member      {name:<22} {member.size:>10,} bytes")
    typer.echo("\n".join(lines))


@app.command()
def verify(
    bundle: str = typer.Argument(..., help=_bundle_help()),
    trusted_key: Optional[list[Path]] = typer.Option(None, "--trusted-key", help="Also require a signature by this public key."),
) -> None:
    """Check a bundle: checksums, signature, manifest, ONNX models load, index loads, shapes agree."""
    from .generator import Generator

    with Generator.open(bundle, threads=1, trusted_keys=_trusted(trusted_key)) as gen:
        gen.bundle.verify_all()
        gen.generate(1, seed=0, steps=1, as_array=True, force_steps=True)
        gen.db.load_index()          # generation from entry_neighbours.npy does not load it
    typer.echo(f"{bundle}: OK")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2 (click
    already exits with 2 on usage errors)."""
    try:
        app()
    except RissoleError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)

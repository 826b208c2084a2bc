"""`rissole-edge export`: a trained run -> one verified `.rissole` bundle.

Steps: load the run's EMA denoiser, autoencoder and database; export the three networks to
ONNX; for int8, calibrate static quantization on the denoiser inputs met along real sampling
trajectories (every timestep and block position) and on real latents; pack the database; then
measure parity (fp32 ONNX vs torch per model, int8 vs fp32 on whole generated images, int8
speed-up) with the very runtime that ships, and write the bundle with those figures inside.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import rissole_edge
from rissole_edge import blocks
from rissole_edge.bundle import DEFAULT_SAMPLER, DEFAULT_STEPS, Bundle, check_guidance
from rissole_edge.errors import UsageError
from rissole_edge.generator import Generator
from rissole_edge.retrieval import keys_of
from rissole_edge.timing import median_seconds

from . import config, database, graph, onnx_export, pack, quantize
from .denoiser import UNet
from .layers import count_parameters
from .recommend import sampling_fields
from .sampling import RunModels, generate
from .train import STAGES, stage_complete

# int8 vs fp32 parity images (seed 1234). The worst image's PSNR is set by a few latent pixels whose
# nearest code flips, so it is a noisy order statistic: 64 images (16 until issue 16) make it
# steadier, and the first 16 are the same images as before (image i does not depend on n).
PARITY_IMAGES = 64


def _check_inputs(run: Path, out: Path, mode: str, target: str, calibration: int, guidance: float) -> None:
    if not (run / "config.json").exists():
        raise UsageError(f"{run} is not a training run (no config.json)")
    cfg = config.load(run / "config.json")
    if cfg.denoiser.self_condition:
        raise UsageError("the run's denoiser uses denoiser.self_condition, a toolchain ablation that bundles "
                         "cannot carry yet: measure it with 'rissole-edge evaluate RUN'")
    for stage in STAGES:
        if not stage_complete(run, stage, cfg):
            raise UsageError(f"the run's {stage} stage is not complete: finish it with 'rissole-edge train --resume'")
    if mode not in ("int8", "fp32"):
        raise UsageError(f"--quantize must be int8 or fp32, got {mode!r}")
    if target not in quantize.TARGETS:
        raise UsageError(f"--target must be one of {', '.join(quantize.TARGETS)}, got {target!r}")
    if not 1 <= calibration <= 10000:
        raise UsageError("--calibration-samples must be between 1 and 10000")
    check_guidance(guidance, "--guidance")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"cannot write {out}: it is a folder")


def _subset(m: RunModels, limit: int | None, seed: int) -> np.ndarray:
    """Database ids kept in the bundle (all, or a seeded random `limit` of them)."""
    n = len(m.db.codes)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < m.cfg.database.window + 2:
        raise UsageError(f"--db-limit must be at least {m.cfg.database.window + 2} (database.window + 2)")
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _database_members(run: Path, m: RunModels, ids: np.ndarray) -> tuple[dict[str, bytes], dict]:
    """The kept images' database, its PCA, index and ef built afresh by the one function every
    database goes through (for all images, this reproduces the run's own)."""
    meta, bps = m.db.meta, m.db.meta["blocks_per_side"]
    codes = m.db.codes[ids]
    codebook = m.ae.codebook.embedding.detach().numpy().astype(np.float32)
    latents = database.code_latents(codebook, blocks.join(codes[:, :, None], bps)[:, 0])
    r = database.build_retrieval(keys_of(latents, meta["key"], bps), m.cfg.database, m.cfg.seed)
    if m.cfg.denoiser.kind == "whole":     # one block: the whole latent
        codes = blocks.join(codes[:, :, None], bps)
    labels_path = run / "database" / "labels.npy"
    labels = np.load(labels_path, allow_pickle=False)[ids] if labels_path.exists() else None
    members = {"codebook.npy": pack.npy(codebook), **database.bundle_members(r, codes, labels)}
    return members, database.manifest_fields(r, m.cfg.database)


def _max_error(session_bytes: bytes, feeds: dict, expected: list[np.ndarray]) -> float:
    sess = ort.InferenceSession(session_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    return float(max(np.abs(g.astype(np.float64) - e.astype(np.float64)).max() for g, e in zip(got, expected)))


def _time_call(model: bytes, feeds: dict, repeats: int = 30) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return median_seconds(lambda: sess.run(None, feeds), repeats)


def denoiser_fields(net: UNet) -> dict:
    """The manifest's `denoiser` fields that the network's architecture decides, and the runtime
    reads: its border window, and whether its blocks attend to each other (written only then, so
    that other bundles stay as they were)."""
    return {"border": net.border, **({"cross_block": True} if net.mixer is not None else {})}


def _psnr(a: np.ndarray, b: np.ndarray) -> list[float]:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return [99.0 if e == 0 else 10 * math.log10(255 ** 2 / e) for e in mse]


def export(run: Path, out: Path, mode: str = "int8", target: str = "x86", calibration_samples: int = 32,
           db_limit: int | None = None, log=print, signing_key: bytes | None = None,
           guidance: float = 1.0, sampler: str = DEFAULT_SAMPLER, sampling_steps: int = DEFAULT_STEPS) -> dict:
    """Export `run` to the bundle `out`; returns the manifest written. `guidance`, `sampler` and
    `sampling_steps` are recorded as what `generate` uses by default: the person who trained and
    measured the model (benchmarks/steps.py) knows what suits it."""
    run, out = Path(run), Path(out)
    from .distill import distilled_fields, export_over_bundle, made_from_bundle
    if made_from_bundle(run):     # a student of a shipped bundle: only its denoiser is new
        return export_over_bundle(run, out, mode, target, calibration_samples, log, signing_key, guidance)
    _check_inputs(run, out, mode, target, calibration_samples, guidance)
    distilled = distilled_fields(run, guidance)     # None for an ordinary run
    recommended = sampling_fields(sampler, sampling_steps, guidance, config.load(run / "config.json").denoiser.timesteps)
    steps = distilled["sampling"]["steps"] if distilled else 25   # calibration and parity trajectories
    torch.set_grad_enabled(False)
    m = RunModels.load(run)
    cfg, meta = m.cfg, m.db.meta
    ids = _subset(m, db_limit, cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)

    log("exporting ONNX models")
    nets = {"denoiser.onnx": onnx_export.denoiser(m.net),
            "decoder.onnx": onnx_export.decoder(m.ae, m.scale, meta["latent_side"]),
            "encoder.onnx": onnx_export.encoder(m.ae, cfg.data.channels, cfg.data.size)}

    log(f"collecting calibration inputs from {calibration_samples} sampling trajectories")
    feeds: list[dict] = []
    calib_ids = rng.permutation(len(m.db.codes))[:calibration_samples].tolist()
    generate(m, calib_ids, seed=cfg.seed, steps=steps, on_call=feeds.append)
    latents = blocks.join(m.latents[calib_ids].numpy(), cfg.denoiser.blocks_per_side) \
        if cfg.denoiser.kind != "whole" else m.latents[calib_ids, 0].numpy()
    latent_feeds = [{"latent": latents[i:i + 8]} for i in range(0, len(latents), 8)]

    parity: dict = {}
    probe = feeds[len(feeds) // 2]
    expected = m.net(*[torch.from_numpy(probe[k]) if k in probe else None
                       for k in ("x", "t", "pos", "cond", "window")]).numpy()
    parity["denoiser_fp32_max_abs_error"] = _max_error(nets["denoiser.onnx"], probe, [expected])
    z = torch.from_numpy(latent_feeds[0]["latent"])
    parity["decoder_fp32_max_abs_error"] = _max_error(
        nets["decoder.onnx"], latent_feeds[0], [m.ae.decode_latent(z / m.scale).clamp(-1, 1).numpy()])
    images = m.ae.decode_latent(z / m.scale).clamp(-1, 1)        # realistic encoder inputs
    enc = m.ae.encode(images)
    parity["encoder_fp32_max_abs_error"] = _max_error(nets["encoder.onnx"], {"image": images.numpy()},
                                                      [enc[0].numpy(), enc[1].numpy()])

    db_members, db_meta = _database_members(run, m, ids)
    channels = m.net.latent_channels
    manifest = {
        "format": "rissole-bundle", "tool_version": rissole_edge.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "name": out.stem,
        "image": {"size": cfg.data.size, "channels": cfg.data.channels, "background": cfg.data.background},
        "latent": {"channels": channels, "side": meta["latent_side"], "scale": m.scale,
                   "codebook_size": cfg.autoencoder.codebook_size},
        "blocks": {"per_side": cfg.denoiser.blocks_per_side if cfg.denoiser.kind != "whole" else 1,
                   "side": m.net.block_size},
        "retrieval": {"k": m.net.k, "window": cfg.database.window if m.net.k else 0, **db_meta},
        "denoiser": {"kind": cfg.denoiser.kind, "fusion": cfg.denoiser.fusion, "weights": "ema",
                     **denoiser_fields(m.net)},
        "schedule": {"kind": cfg.denoiser.schedule, "timesteps": cfg.denoiser.timesteps,
                     "beta_start": 1e-4, "beta_end": 0.02, "prediction": "epsilon"},
        "sampling": distilled["sampling"] if distilled else recommended,
        "dataset": meta["dataset"],
        "parameters": {"denoiser": count_parameters(m.net), "decoder": count_parameters(m.ae.decoder)
                       + m.ae.codebook.embedding.numel(), "encoder": count_parameters(m.ae.encoder)},
        "memory": {"block_bytes": graph.activation_bytes(nets["denoiser.onnx"]),
                   "image_bytes": graph.activation_bytes(nets["decoder.onnx"])},
    }

    # Parity runs on in-memory bundles: no file that looks like a bundle exists before the real one.
    fp32_bundle = Bundle.in_memory({**manifest, "quantization": {"mode": "fp32"}}, {**nets, **db_members})
    final = dict(nets)
    quant_info: dict = {"mode": "fp32"}
    if mode == "int8":
        log(f"quantizing to int8 for {target} on {len(feeds)} denoiser and {len(latent_feeds)} decoder batches")
        final["denoiser.onnx"], info = quantize.quantize(nets["denoiser.onnx"], feeds, target,
                                                         keep_fp32=True, correct_bias=True)
        final["denoiser.onnx"], manifest["graph"] = graph.optimize(final["denoiser.onnx"])   # bit-identical
        final["decoder.onnx"], _ = quantize.quantize(nets["decoder.onnx"], latent_feeds, target)
        final["decoder.onnx"], manifest["graph"]["decoder_rewrites"] = graph.optimize_decoder(final["decoder.onnx"])
        quant_info = {"mode": "int8", **{k: v for k, v in info.items() if k != "fp32_nodes"},
                      "denoiser_fp32_nodes": info["fp32_nodes"], "models": ["denoiser.onnx", "decoder.onnx"],
                      "fp32_models": ["encoder.onnx"]}
        int8_bundle = Bundle.in_memory({**manifest, "quantization": quant_info}, {**final, **db_members})
        log(f"measuring int8 parity on {PARITY_IMAGES} images")
        with Generator.open(fp32_bundle, threads=2) as g32, Generator.open(int8_bundle, threads=2) as g8:
            a = g32.generate(PARITY_IMAGES, seed=1234, steps=steps, as_array=True)
            b = g8.generate(PARITY_IMAGES, seed=1234, steps=steps, as_array=True)
        psnr = _psnr(a, b)
        big = {k: np.concatenate([f[k] for f in feeds[:4]]) for k in feeds[0]}
        t32, t8 = _time_call(nets["denoiser.onnx"], big), _time_call(final["denoiser.onnx"], big)
        parity.update({"int8_vs_fp32_psnr_mean": float(np.mean(psnr)), "int8_vs_fp32_psnr_min": float(min(psnr)),
                       "parity_images": PARITY_IMAGES, "parity_steps": steps,
                       "denoiser_call_ms_fp32": t32 * 1e3, "denoiser_call_ms_int8": t8 * 1e3,
                       "denoiser_call_blocks": int(len(big["x"])), "int8_speedup": t32 / t8})
    manifest.update({"quantization": quant_info, "parity": parity})
    if distilled:
        manifest["distilled"] = distilled["distilled"]
    pack.write(out, manifest, database.with_entry_neighbours(manifest, {**final, **db_members}), signing_key)
    return manifest

"""Retrain the fashion denoiser with another architecture on the shipped bundle's autoencoder (issue 16).

    python benchmarks/ablations/arch_train.py train --variant rb1 --out RUN [--steps 10000] [--resume]
    python benchmarks/ablations/arch_train.py bundle RUN -o OUT.rissole

The shipped bundle's training run is not kept, but its autoencoder is in the bundle: the
60,000 training images through the bundle's fp32 encoder give the run's codes again, and the
database's own procedure (`database.build_retrieval`, `neighbour_lists`, seed 0) its neighbour
lists. A variant (benchmarks/ablations/arch_cost.py's names) is then trained as
`rissole-edge train` trains the denoiser (`train.fit_denoiser`: seed 0, the recipe's steps,
batch and learning rate), so that the architecture is the one thing that differs from the
two-block model that bundle shipped until issue 16, and one background job can do it: one torch thread, checkpoints every 500
steps, --resume.

`bundle` puts the run's EMA denoiser into a copy of the shipped bundle (decoder, encoder,
database and sampling unchanged), int8 as `rissole-edge export` makes it (calibrated on the
fp32 denoiser's own 25-step trajectories, default graph rewrites, int8 vs fp32 parity on 16
images), for `rissole-edge evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import rissole_edge
import arch_cost
from arch_cost import BUNDLE, VARIANTS
from rissole_edge import blocks
from rissole_edge.bundle import Bundle, Spec
from rissole_edge.generator import Generator
from rissole_edge.images import from_uint8
from rissole_edge.retrieval import keys_of
from rissole_export import checkpoint, config, data, database, denoiser, graph, onnx_export, pack, quantize, train
from rissole_export.exporter import PARITY_IMAGES, _psnr
from rissole_export.distill import _Recording   # an ORT session that keeps every call's inputs
from rissole_export.layers import count_parameters

CALIBRATION_IMAGES = 32       # as `rissole-edge export`'s default
CALIBRATION_STEPS = 25


def training_config(variant: str, steps: int | None) -> config.RunConfig:
    cfg = arch_cost.variant_config(variant)
    if steps:
        cfg.denoiser.steps = steps
    cfg.data.source = "fashion-mnist"
    cfg.data.size, cfg.data.channels = 32, 1
    return cfg


def training_set(cfg: config.RunConfig, folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    """(N, P, C, s, s) scaled latent blocks of the training images and their neighbour lists,
    made once from the shipped bundle's encoder and kept in `folder`."""
    cached = folder / "latents.npy", folder / "neighbours.npy"
    if not all(p.exists() for p in cached):
        bundle = Bundle.open(BUNDLE)
        spec = Spec.from_manifest(bundle.manifest)
        images = data.load("fashion-mnist", cfg.data).train
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        encoder = ort.InferenceSession(bundle.read("encoder.onnx"), options, providers=["CPUExecutionProvider"])
        codes = np.concatenate([encoder.run(["codes"], {"image": from_uint8(images[i:i + 1000])})[0]
                                for i in range(0, len(images), 1000)])
        kept = np.sort(np.random.default_rng(cfg.seed).permutation(len(codes))[:spec.images])  # export --db-limit
        shipped = blocks.join(bundle.array("codes.npy")[:, :, None], spec.blocks_per_side)[:, 0]
        same = float((codes[kept] == shipped).mean())
        print(f"re-encoded codes equal to the bundle's for its {spec.images} images: {same:.4%}", file=sys.stderr)
        codebook = bundle.array("codebook.npy")
        latents = database.code_latents(codebook, codes)
        r = database.build_retrieval(keys_of(latents, cfg.database.key, spec.blocks_per_side), cfg.database, cfg.seed)
        neighbours = database.neighbour_lists(r.index, r.keys, database.duplicate_groups(codes), cfg.database.window, 1)
        scaled = blocks.split(latents * spec.latent_scale, spec.blocks_per_side).astype(np.float32)
        for path, array in zip(cached, (scaled, neighbours)):
            np.save(path.with_suffix(".partial.npy"), array)
            path.with_suffix(".partial.npy").replace(path)
    return torch.from_numpy(np.load(cached[0], allow_pickle=False)), np.load(cached[1], allow_pickle=False)


def train_variant(variant: str, out: Path, steps: int | None, resume: bool) -> dict:
    cfg = training_config(variant, steps)
    if (out / "denoiser.safetensors").exists() and not resume:
        raise SystemExit(f"error: {out} holds a checkpoint: pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists() and config.first_difference(config.load(out / "config.json"), cfg):
        raise SystemExit(f"error: {out} was started with another config "
                         f"({config.first_difference(config.load(out / 'config.json'), cfg)})")
    config.save(cfg, out / "config.json")
    latents, neighbours = training_set(cfg, out)
    torch.manual_seed(cfg.seed)
    net = denoiser.build(cfg.denoiser, latents.shape[2], latents.shape[3] * cfg.denoiser.blocks_per_side)
    ctx = train.Context(out, cfg, None, progress=True)
    began = time.monotonic()
    with train.stop_on_signals(ctx):
        try:
            train.fit_denoiser(ctx, net, latents, neighbours)
        except train.Stopped as e:
            return {"variant": variant, "status": str(e)}
    return {"variant": variant, "steps": cfg.denoiser.steps, "parameters": count_parameters(net),
            "seconds_this_session": round(time.monotonic() - began, 1)}


def make_bundle(run: Path, out: Path) -> dict:
    """The shipped bundle with the run's EMA denoiser, int8 and rewritten as export makes it."""
    cfg = config.load(run / "config.json")
    shipped = Bundle.open(BUNDLE)
    manifest, members = pack.contents(shipped)
    spec = Spec.from_manifest(shipped.manifest)
    net = denoiser.build(cfg.denoiser, spec.latent_channels, spec.latent_side)
    net.load_state_dict(checkpoint.load_weights(run / "denoiser.safetensors", "ema"))
    with torch.no_grad():
        fp32 = onnx_export.denoiser(net.eval())
    manifest.pop("parity", None)
    manifest.update(name=out.stem, tool_version=rissole_edge.__version__,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"), parameters={**manifest["parameters"], "denoiser": count_parameters(net)},
                    memory={**manifest["memory"], "block_bytes": graph.activation_bytes(fp32)})
    feeds: list[dict] = []
    with Generator.open(Bundle.in_memory({**manifest, "quantization": {"mode": "fp32"}},
                                         {**members, "denoiser.onnx": fp32}), threads=1) as gen:
        gen.denoiser = _Recording(gen.denoiser, feeds)
        gen.generate(CALIBRATION_IMAGES, seed=cfg.seed, steps=CALIBRATION_STEPS, as_array=True)
    model, info = quantize.quantize(fp32, feeds, "x86", keep_fp32=True, correct_bias=True)
    manifest["quantization"] = {**manifest["quantization"], **{k: v for k, v in info.items() if k != "fp32_nodes"},
                                "denoiser_fp32_nodes": info["fp32_nodes"]}
    model, record = graph.optimize(model)
    manifest["graph"] = {**record, "decoder_rewrites": shipped.manifest.get("graph", {}).get("decoder_rewrites", [])}
    bundles = [Bundle.in_memory(manifest, {**members, "denoiser.onnx": m}) for m in (fp32, model)]
    with Generator.open(bundles[0], threads=1) as g32, Generator.open(bundles[1], threads=1) as g8:
        psnr = _psnr(*(g.generate(PARITY_IMAGES, seed=1234, steps=CALIBRATION_STEPS, as_array=True) for g in (g32, g8)))
    manifest["parity"] = {"int8_vs_fp32_psnr_mean": float(np.mean(psnr)), "int8_vs_fp32_psnr_min": float(min(psnr)),
                          "parity_images": PARITY_IMAGES, "parity_steps": CALIBRATION_STEPS}
    pack.write(out, manifest, {**members, "denoiser.onnx": model})
    return {"bundle": str(out), "parameters": count_parameters(net), **record, **manifest["parity"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--variant", required=True, choices=[v for v in VARIANTS if v != "no-norm"])
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, help="default: the recipe's (10,000)")
    t.add_argument("--resume", action="store_true")
    b = sub.add_parser("bundle")
    b.add_argument("run", type=Path)
    b.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "train":
        result = train_variant(args.variant, args.out, args.steps, args.resume)
    else:
        if not (args.run / "denoiser.safetensors").exists():
            print(f"error: {args.run} has no denoiser checkpoint", file=sys.stderr)
            return 2
        result = make_bundle(args.run, args.out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

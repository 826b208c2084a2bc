"""Seams at 64x64: does border-strip conditioning (denoiser.border) remove them? (issue 17, item 2)

The twemoji run behind the shipped teacher bundle (twemoji-teacher) is not kept, and its
autoencoder costs more than this ablation may spend, so both rows are fine-tunes of the shipped bundle's denoiser on the
bundle's own latents and neighbour lists (export/teacher.py rebuilds all three from the
bundle): the same start, steps, batch, seed and learning rate for both. The border row's
window convolution starts at zero, so both rows start as the same network. Images are decoded
with the bundle's decoder; the seam control is the held-out test emoji through the bundle's
encoder and decoder, as `evaluate` measures it.

    python benchmarks/ablations/seams.py train --row baseline --out RUN [--steps N] [--resume]
    python benchmarks/ablations/seams.py train --row border --out RUN [--border 2] ...
    python benchmarks/ablations/seams.py train --row seamloss --out RUN [--border 2] [--seam-loss 0.25] ...
    python benchmarks/ablations/seams.py start --out RUN      # the teacher's weights as a step-0 run
    python benchmarks/ablations/seams.py evaluate RUN... [-n 1000] [--json OUT]
    rissole-edge export RUN -o RUN.rissole       # a row as a bundle: the teacher's with this denoiser
    python benchmarks/ablations/seams.py runtime RUN.rissole --against RUN [-n 1000] [--json OUT]

Training checkpoints every 500 steps and continues with --resume; one torch thread (the
machine is shared). `evaluate` prints one JSON object per run (and the control), keeps the
images beside each run and draws the first 64 as a grid beside --json. Each run holds a copy
of the teacher bundle (teacher.rissole), so that `rissole-edge export` makes a bundle of it
(distill.export_over_bundle); `runtime` generates with such a bundle through the runtime
(int8), on the same queries and noise as `evaluate`, and measures it against the run's torch
images (kept by `evaluate`): PSNR and the seam ratio, paired.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rissole_edge.generator import Generator, Query
from rissole_edge.images import to_uint8
from rissole_export import checkpoint, config, data, denoiser, distill, evaluate, teacher, train
from rissole_export.diffusion import Diffusion
from rissole_export.sampling import generate_latents

ROOT = Path(__file__).resolve().parents[2]
# The teacher every row starts from, and the recipe it was trained with. The rows in
# benchmarks/results/quality.md were made from the 1.33 M-parameter teacher shipped until the
# border-conditioned one replaced it; to re-run them, pass that one:
#   git show 4c93857:models/twemoji-teacher.rissole > v1.rissole
#   git show 4c93857:models/twemoji-teacher.toml > v1.toml
#   python benchmarks/ablations/seams.py --teacher v1.rissole --recipe v1.toml train ...
# The teacher shipped since stop 27 attends across blocks, and such a teacher cannot be rebuilt
# from its bundle: for twemoji-v2 pass `git show 421bffa:models/twemoji-teacher.rissole` and
# benchmarks/ablations/recipes/twemoji-v2.toml. (main() sets both from the command line,
# before any row reads them.)
BUNDLE = ROOT / "models" / "twemoji-teacher.rissole"
RECIPE = ROOT / "models" / "twemoji-teacher.toml"
CHUNK = 100               # images per sampling call: bounds memory
BOOTSTRAP = 200           # resamples of the seam-ratio intervals


def base_config() -> config.RunConfig:
    return config.resolve("small", config.read_config_file(RECIPE))


def build_net(cfg: config.RunConfig, start: teacher.Teacher) -> denoiser.UNet:
    """The denoiser of `cfg` for the teacher's latent geometry (fresh weights)."""
    _, _, channels, side, _ = start.latents.shape
    return denoiser.build(cfg.denoiser, channels, side * cfg.denoiser.blocks_per_side)


def train_row(row: str, out: Path, steps: int, border: int, seam_loss: float, resume: bool) -> dict:
    base = base_config()
    cfg = base_config()
    cfg.denoiser.steps = steps
    cfg.denoiser.border = border if row in ("border", "seamloss") else 0
    cfg.denoiser.seam_loss = seam_loss if row == "seamloss" else 0.0
    cfg.data.source = "twemoji"
    if (out / "denoiser.safetensors").exists() and not resume:
        print(f"{out} holds a checkpoint: pass --resume to continue it", file=sys.stderr)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    config.save(cfg, out / "config.json")
    keep_teacher(out)
    start = teacher.from_bundle(BUNDLE, base)
    net = build_net(cfg, start)
    missing, unexpected = net.load_state_dict(start.net.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("border_in.") for k in missing), (missing, unexpected)
    ctx = train.Context(out, cfg, None, progress=True)
    began = time.monotonic()
    with train.stop_on_signals(ctx):
        try:
            train.fit_denoiser(ctx, net, start.latents, start.neighbours)
        except train.Stopped as e:
            return {"row": row, "status": str(e)}
    return {"row": row, "steps": steps, "border": cfg.denoiser.border, "seam_loss": cfg.denoiser.seam_loss,
            "seconds": round(time.monotonic() - began, 1)}


def seam_interval(sets: list[np.ndarray], seed: int) -> list[float]:
    """95% bootstrap interval (images resampled, BOOTSTRAP times) of the seam ratio of one set,
    or of the difference second - first of two sets of the same queries and noise (paired:
    the same images are drawn from both)."""
    r = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP):
        pick = r.integers(0, len(sets[0]), len(sets[0]))
        ratios = [evaluate.seam_ratio(images[pick], 2) for images in sets]
        values.append(ratios[-1] - ratios[0] if len(ratios) == 2 else ratios[0])
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]


def save_start(out: Path) -> None:
    """The teacher's own weights (model and EMA) as a run at step 0: the row both fine-tunes start from."""
    cfg = base_config()
    cfg.data.source = "twemoji"
    start = teacher.from_bundle(BUNDLE, cfg)
    out.mkdir(parents=True, exist_ok=True)
    config.save(cfg, out / "config.json")
    keep_teacher(out)
    checkpoint.save(out / "denoiser.safetensors", 0, {"model": start.net, "ema": copy.deepcopy(start.net)}, {})


def keep_teacher(out: Path) -> None:
    """A copy of the teacher bundle in the run: what `rissole-edge export RUN` builds the row's bundle on."""
    if not (out / distill.TEACHER_BUNDLE).exists():
        shutil.copyfile(BUNDLE, out / distill.TEACHER_BUNDLE)


def evaluate_runs(runs: list[Path], n: int, seed: int, steps: int, grids: Path | None) -> list[dict]:
    """One row per run and the control row; the first 64 images of each run go to
    grids/seams-RUN.png (into the run itself without `grids`)."""
    start = teacher.from_bundle(BUNDLE, base_config())
    images = data.load("twemoji", base_config().data)
    test = images.test
    train_px = evaluate._unit(images.train)
    with Generator.open(BUNDLE, threads=1) as gen:
        control = evaluate._onnx_round_trip(gen)(test)

        def decode(latent: np.ndarray) -> np.ndarray:
            return to_uint8(gen.decoder.run(["image"], {"latent": latent.astype(np.float32)})[0])

        f_test = evaluate.features(test)
        rows = [{"row": "control: test emoji through the bundle's autoencoder", "n": len(test),
                 "seam_ratio": evaluate.seam_ratio(control, 2), "seam_ratio_test": evaluate.seam_ratio(test, 2),
                 "block_agreement": evaluate.block_agreement(evaluate._unit(control), train_px, 2),
                 "block_agreement_test": evaluate.block_agreement(evaluate._unit(test), train_px, 2)}]
        ids = np.random.default_rng(seed).integers(0, len(start.latents), n).tolist()
        outputs: list[np.ndarray] = []
        for run in runs:
            cfg = config.load(run / "config.json")
            net = build_net(cfg, start)
            net.load_state_dict(checkpoint.load_weights(run / "denoiser.safetensors", "ema"))
            net.eval()
            began = time.monotonic()
            kept = kept_images(run, n, seed, steps)      # kept beside the run, for re-analysis
            if kept.exists():
                generated = np.load(kept, allow_pickle=False)
            else:
                diffusion = Diffusion(cfg.denoiser.schedule, cfg.denoiser.timesteps)
                generated = np.concatenate([
                    decode(generate_latents(net, start.latents, start.neighbours, diffusion, ids[i:i + CHUNK],
                                            seed * 1000 + i // CHUNK, steps, "ddim", start.guidance))
                    for i in range(0, n, CHUNK)])
                np.save(kept, generated)
            outputs.append(generated)
            rows.append({"row": str(run), "trained_steps": checkpoint.step_of(run / "denoiser.safetensors"),
                         "border": cfg.denoiser.border, "n": n, "ddim_steps": steps, "guidance": start.guidance,
                         "seam_ratio": evaluate.seam_ratio(generated, 2),
                         "seam_ratio_over_control": evaluate.seam_ratio(generated, 2) / rows[0]["seam_ratio"],
                         "fd_effnetlite0_vs_test": evaluate.frechet_distance(evaluate.features(generated), f_test),
                         "block_agreement": evaluate.block_agreement(evaluate._unit(generated), train_px, 2),
                         "seam_ratio_95": seam_interval([generated], seed),
                         "generate_seconds": round(time.monotonic() - began, 1)})
            if len(outputs) > 1:
                rows[-1]["seam_ratio_minus_first_run_95"] = seam_interval([outputs[0], generated], seed)
            train.save_grid(generated[:64], (grids or run) / f"seams-{run.name}.png")
    return rows


def kept_images(run: Path, n: int, seed: int, steps: int) -> Path:
    return run / f"generated-n{n}-seed{seed}-steps{steps}.npy"


def runtime_row(bundle: Path, against: Path, n: int, seed: int, steps: int) -> dict:
    """The bundle through the runtime on `evaluate`'s queries and noise: image j is torch chunk
    j // CHUNK's image j % CHUNK (seed * 1000 + j // CHUNK), so first_index = j % CHUNK."""
    reference = np.load(kept_images(against, n, seed, steps), allow_pickle=False)
    images = data.load("twemoji", base_config().data)
    with Generator.open(bundle, threads=1) as gen:
        ids = np.random.default_rng(seed).integers(0, gen.spec.images, n).tolist()
        began = time.monotonic()
        generated = np.concatenate([
            gen.generate(1, seed=seed * 1000 + j // CHUNK, first_index=j % CHUNK, steps=steps, sampler_name="ddim",
                         guidance=gen.spec.guidance, query=Query(entry=ids[j]), as_array=True) for j in range(n)])
        seconds = time.monotonic() - began
    with Generator.open(BUNDLE, threads=1) as gen:
        control = evaluate.seam_ratio(evaluate._onnx_round_trip(gen)(images.test), 2)
    mse = ((generated.astype(np.float64) - reference) ** 2).reshape(n, -1).mean(1)
    psnr = 10 * np.log10(255 ** 2 / np.maximum(mse, 1e-12))
    ratio = evaluate.seam_ratio(generated, 2)
    return {"bundle": str(bundle), "against": str(against), "n": n, "ddim_steps": steps, "control": control,
            "psnr_vs_torch_mean": float(psnr.mean()), "psnr_vs_torch_median": float(np.median(psnr)),
            "psnr_vs_torch_min": float(psnr.min()), "seam_ratio": ratio, "seam_ratio_over_control": ratio / control,
            "seam_ratio_95": seam_interval([generated], seed),
            "torch_seam_ratio": evaluate.seam_ratio(reference, 2),
            "seam_ratio_minus_torch_95": seam_interval([reference, generated], seed),
            "fd_effnetlite0_vs_test": evaluate.frechet_distance(evaluate.features(generated),
                                                                 evaluate.features(images.test)),
            "generate_seconds": round(seconds, 1)}


def main() -> None:
    global BUNDLE, RECIPE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, default=BUNDLE, help="the teacher bundle (default: the shipped twemoji-teacher)")
    p.add_argument("--recipe", type=Path, default=RECIPE, help="its training config (default: models/twemoji-teacher.toml)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--row", choices=("baseline", "border", "seamloss"), required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--border", type=int, default=2)
    t.add_argument("--seam-loss", type=float, default=0.25, help="seamloss row: weight of denoiser.seam_loss")
    t.add_argument("--resume", action="store_true")
    sub.add_parser("start").add_argument("--out", type=Path, required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("runs", type=Path, nargs="+")
    e.add_argument("-n", type=int, default=1000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--json", type=Path)
    r = sub.add_parser("runtime")
    r.add_argument("bundle", type=Path)
    r.add_argument("--against", type=Path, required=True, help="the run it was exported from (its kept torch images)")
    r.add_argument("-n", type=int, default=1000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--json", type=Path)
    args = p.parse_args()
    BUNDLE, RECIPE = args.teacher, args.recipe
    torch.set_num_threads(1)
    if args.command == "start":
        save_start(args.out)
        return
    if args.command == "train":
        print(json.dumps(train_row(args.row, args.out, args.steps, args.border, args.seam_loss, args.resume)))
        return
    if args.command == "runtime":
        rows = [runtime_row(args.bundle, args.against, args.n, args.seed, args.steps)]
    else:
        rows = evaluate_runs(args.runs, args.n, args.seed, args.steps, args.json.parent if args.json else None)
    text = json.dumps(rows, indent=2) + "\n"
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

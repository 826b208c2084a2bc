"""int8 recipes for the fashion denoiser: image parity against fp32 and call cost (issue 16).

    python benchmarks/ablations/int8_study.py RUN [--images 256] [--seeds 1234,99]
        [--variants a,b] [--rounds 41] [--sensitivity]

RUN is the shipped denoiser's training run (`arch_train.py train --variant rb1`). Each variant
quantizes the run's EMA denoiser (ONNX as `export` makes it) on the calibration calls that
`arch_train.py bundle` records (32 images, 25 steps, the run's seed), takes it through the
default graph rewrites, and swaps it into the shipped bundle (decoder and database unchanged,
so only the denoiser differs between the fp32 and int8 images). Per variant and image seed:
mean and worst int8-vs-fp32 image PSNR over the first 16, 64 and all --images images (25
steps, the bundle's sampler, as the export's parity check), and how many images fall under
31 dB; on the first seed, the latent error (RMS of int8 - fp32 before the decoder, over the
fp32 latent's RMS) and the codes that flip at the decoder's snap per image. Call cost: CPU time
of one thread on calls of 256 recorded rows, all variants interleaved round by round (medians),
as a ratio to "plain" (the recipe before issue 16).

--sensitivity also ranks the quantized convolutions: the latent error with only that conv in
int8, and the call ratio with only that conv in fp32.
Prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantType

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

import op_profile  # noqa: E402  (benchmarks/ is not a package)
from rissole_edge import blocks  # noqa: E402
from rissole_edge.bundle import Bundle, Spec  # noqa: E402
from rissole_edge.generator import Generator  # noqa: E402
from rissole_export import checkpoint, config, denoiser, graph, onnx_export, pack, quantize  # noqa: E402
from rissole_export.distill import _Recording  # noqa: E402
from rissole_export.exporter import _psnr  # noqa: E402

BUNDLE = BENCH.parent / "models" / "fashion-mnist.rissole"
CALIBRATION_IMAGES, STEPS = 32, 25       # as arch_train.py bundle
THRESHOLD_DB = 31.0


class Study:
    def __init__(self, run: Path):
        self.shipped = Bundle.open(BUNDLE)
        self.manifest, self.members = pack.contents(self.shipped)
        self.spec = Spec.from_manifest(self.shipped.manifest)
        self.cfg = config.load(run / "config.json")
        net = denoiser.build(self.cfg.denoiser, self.spec.latent_channels, self.spec.latent_side)
        net.load_state_dict(checkpoint.load_weights(run / "denoiser.safetensors", "ema"))
        self.fp32 = onnx_export.denoiser(net.eval())
        self.feeds = self.record(CALIBRATION_IMAGES, self.cfg.seed)
        self.codebook = self.shipped.array("codebook.npy")

    def _open(self, model: bytes) -> Generator:
        return Generator.open(Bundle.in_memory(self.manifest, {**self.members, "denoiser.onnx": model}), threads=1)

    def record(self, images: int, seed: int) -> list[dict]:
        feeds: list[dict] = []
        with self._open(self.fp32) as gen:
            gen.denoiser = _Recording(gen.denoiser, feeds)
            gen.generate(images, seed=seed, steps=STEPS, as_array=True)
        return feeds

    def sample(self, model: bytes, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Images and the latents the decoder got (unscaled, before its snap to codes)."""
        latents: list[np.ndarray] = []
        with self._open(model) as gen:
            decode = gen._decode
            gen._decode = lambda z, threads=1: (latents.append(blocks.join(z, self.spec.blocks_per_side)),
                                                decode(z, threads))[1]
            images = gen.generate(n, seed=seed, steps=STEPS, as_array=True)
        return images, np.concatenate(latents) / self.spec.latent_scale

    def codes(self, z: np.ndarray) -> np.ndarray:
        v = z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1])
        return ((v[:, None, :] - self.codebook[None]) ** 2).sum(-1).argmin(1).reshape(len(z), -1)

    def int8(self, fp32_nodes: list[str], bias: bool = False, feeds: list[dict] | None = None,
             activations: QuantType = QuantType.QUInt8, method: CalibrationMethod = CalibrationMethod.MinMax,
             extra: dict | None = None) -> bytes:
        feeds = feeds or self.feeds
        model = quantize.static(self.fp32, feeds, activations, QuantType.QInt8, fp32_nodes, method, extra)
        if bias:
            model = quantize.correct_biases(self.fp32, model, feeds)
        return graph.optimize(model)[0]


def fp16_weights(model: bytes) -> bytes:
    """The fp32 model with its weights rounded to fp16 and back: the error floor of a tiny,
    non-int8 perturbation (how often codes flip when almost nothing changes)."""
    m = onnx.load_from_string(model)
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.size > 16:
            init.CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), init.name))
    return m.SerializeToString()


def variants(s: Study) -> dict[str, Callable[[], bytes]]:
    edges = quantize.edge_convs(s.fp32)
    convs = [n.name for n in onnx.load_from_string(s.fp32).graph.node if n.op_type == "Conv"]
    skips = [n for n in convs if n.endswith("/skip/Conv")]
    last, before = quantize.sensitive_convs(s.fp32)[-1], "/net/up.3/skip/Conv"
    six = [last, before, "/net/up.4/conv2/Conv", "/net/down.1/conv/Conv", "/net/up.3/conv1/Conv", "/net/up.3/conv2/Conv"]
    m = CalibrationMethod
    return {
        "plain": lambda: s.int8(edges),
        "percentile-99.999": lambda: s.int8(edges, method=m.Percentile),
        "percentile-99.99": lambda: s.int8(edges, method=m.Percentile, extra={"CalibPercentile": 99.99}),
        "entropy": lambda: s.int8(edges, method=m.Entropy),
        "distribution": lambda: s.int8(edges, method=m.Distribution),
        "minmax-moving-average": lambda: s.int8(edges, extra={"CalibMovingAverage": True}),
        "calibration-128-images": lambda: s.int8(edges, feeds=s.record(4 * CALIBRATION_IMAGES, s.cfg.seed)),
        "calibration-seed-1": lambda: s.int8(edges, feeds=s.record(CALIBRATION_IMAGES, 1)),
        "symmetric-s8-activations": lambda: s.int8(edges, activations=QuantType.QInt8),
        "bias-correction": lambda: s.int8(edges, bias=True),
        "last-1x1-fp32": lambda: s.int8(edges + [last]),
        "last-two-skips-fp32": lambda: s.int8(edges + [last, before]),
        "bias+last-1x1-fp32 (shipped)": lambda: s.int8(edges + [last], bias=True),
        "bias+last-two-skips-fp32": lambda: s.int8(edges + [last, before], bias=True),
        "bias+all-skips-fp32": lambda: s.int8(edges + skips, bias=True),
        "bias+six-convs-fp32": lambda: s.int8(edges + six, bias=True),
        "fp16-weights (not int8)": lambda: fp16_weights(s.fp32),
    }


def parity(s: Study, model: bytes, refs: dict[int, tuple[np.ndarray, np.ndarray]], n: int) -> dict:
    out: dict = {}
    for i, (seed, (images, latents)) in enumerate(refs.items()):
        got, z = s.sample(model, n, seed)
        p = np.array(_psnr(images, got))
        out[f"seed_{seed}"] = {f"{k}": {"mean": round(float(p[:k].mean()), 2), "worst": round(float(p[:k].min()), 2)}
                               for k in sorted({16, 64, n}) if k <= n}
        out[f"seed_{seed}"][f"under_{THRESHOLD_DB:g}_db"] = int((p < THRESHOLD_DB).sum())
        if i == 0:
            out["latent_error"] = round(float(np.sqrt(((z - latents) ** 2).mean() / (latents ** 2).mean())), 5)
            out["flips_per_image"] = round(float((s.codes(z) != s.codes(latents)).sum() / n), 2)
    return out


def sensitivity(s: Study, refs: dict, n: int, rounds: int) -> dict:
    edges = quantize.edge_convs(s.fp32)
    convs = [c.name for c in onnx.load_from_string(s.fp32).graph.node if c.op_type == "Conv" and c.name not in edges]
    seed, (_, latents) = next(iter(refs.items()))
    latents = latents[:n]
    out, kept = {}, {}
    for name in convs:
        alone = s.int8([c for c in convs if c != name] + edges)
        z = s.sample(alone, n, seed)[1]
        out[name] = {"latent_error_int8_alone": round(float(np.sqrt(((z - latents) ** 2).mean() / (latents ** 2).mean())), 5)}
        kept[name] = s.int8(edges + [name])
    ratios = call_ratios(s, {"plain": s.int8(edges), **kept}, rounds)
    for name in convs:
        out[name]["call_ratio_fp32_alone"] = ratios[name]
    return out


def call_ratios(s: Study, models: dict[str, bytes], rounds: int) -> dict[str, float]:
    feeds = {k: np.concatenate([f[k] for f in s.feeds])[:256] for k in s.feeds[0]}
    times = op_profile.call_times(models, feeds, rounds)
    return {k: round(t / times["plain"], 3) for k, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seeds", default="1234,99")
    parser.add_argument("--variants", help="comma-separated names (default: all)")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--sensitivity", action="store_true")
    args = parser.parse_args()
    if not (args.run / "denoiser.safetensors").exists():
        print(f"error: {args.run} has no denoiser checkpoint", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    with contextlib.redirect_stdout(sys.stderr):     # onnxruntime's calibrators print progress
        s = Study(args.run)
        table = variants(s)
        names = args.variants.split(",") if args.variants else list(table)
        unknown = [n for n in names if n not in table]
        if unknown:
            print(f"error: unknown variant {unknown[0]!r}; choose from {', '.join(table)}")
            return 2
        refs = {int(seed): s.sample(s.fp32, args.images, int(seed)) for seed in args.seeds.split(",")}
        models = {"plain": table["plain"](), **{n: table[n]() for n in names if n != "plain"}}
        result = {"images": args.images, "steps": STEPS, "variants": {n: parity(s, m, refs, args.images)
                                                                       for n, m in models.items()}}
        for name, ratio in call_ratios(s, models, args.rounds).items():
            result["variants"][name]["call_ratio"] = ratio
        if args.sensitivity:
            result["sensitivity"] = sensitivity(s, refs, min(64, args.images), args.rounds)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

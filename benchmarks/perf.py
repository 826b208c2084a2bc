"""Latency and memory of rissole-edge against what a user would run instead, in one run.

    python benchmarks/perf.py --run runs/fashion-small --bundle models/fashion-mnist.rissole [--quick]

Every configuration runs in its own child process (peak RSS = the child's VmHWM):
  sweep   the runtime over memory budgets (minimum .. generous), threads (1, 2), steps;
  peers   (a) the same model, fp32, in PyTorch eager (the toolchain's sampler);
          (b) a whole-latent LDM of the same UNet family and parameter count, PyTorch and ORT;
          (c) diffusers UNet2DModel + DDIMScheduler of comparable size on the same latent;
  limit   multiply-accumulates of one denoiser call and one image, achieved GOPS, and the best
          GOPS onnxruntime reaches on this CPU for a large fp32 and int8 convolution.
Writes benchmarks/results/perf.json, perf.md and three PNG plots. Timing peers (b) and (c)
does not need trained weights: they run with random ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from plots import plot as _plot   # matplotlib, imported only when plotting

RESULTS = Path(__file__).parent / "results"
BATCH = 8            # images per timed generation call for every contender


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def _timed(fn, repeats: int) -> float:
    fn()                                   # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


# ------------------------------------------------------------------ children (one per process)

def child_torch_eager(run: str, steps: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from rissole_export.sampling import RunModels, generate
    m = RunModels.load(Path(run))
    ids = list(range(BATCH))
    s = _timed(lambda: generate(m, ids, seed=0, steps=steps), 2)
    return {"per_image_s": s / BATCH, "peak_rss_mb": _peak_mb()}


def _whole_unet(run: str):
    from rissole_export import config, denoiser
    cfg = config.load(Path(run) / "config.json")
    cfg.denoiser.kind = "whole"
    return denoiser.build(cfg.denoiser, 4, 8).eval()


def child_whole_torch(run: str, steps: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from rissole_export.diffusion import Diffusion
    net, diffusion = _whole_unet(run), Diffusion()
    pos = torch.zeros(BATCH, dtype=torch.long)
    with torch.no_grad():
        s = _timed(lambda: diffusion.sample(lambda x, t: net(x, t, pos), torch.randn(BATCH, 4, 8, 8), steps), 2)
    return {"per_image_s": s / BATCH, "peak_rss_mb": _peak_mb(), "parameters": sum(p.numel() for p in net.parameters())}


def child_whole_ort(run: str, steps: int, threads: int) -> dict:
    import onnxruntime as ort
    from rissole_export import onnx_export
    from rissole_edge import sampler
    from rissole_edge.schedule import alphas_cumprod
    model = onnx_export.denoiser(_whole_unet(run))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    alpha = alphas_cumprod("linear", 1000)

    def eps(x, t):
        feeds = {"x": x, "t": t, "pos": np.zeros(len(x), np.int64)}
        return sess.run(["eps"], {k: v for k, v in feeds.items() if k in names})[0]
    x = np.random.default_rng(0).standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    s = _timed(lambda: sampler.sample(eps, x, alpha, steps, "ddim"), 2)
    return {"per_image_s": s / BATCH, "peak_rss_mb": _peak_mb()}


def child_diffusers(run: str, steps: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from diffusers import DDIMScheduler, UNet2DModel
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(40, 80), layers_per_block=2,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")

    def run_once():
        sched.set_timesteps(steps)
        x = torch.randn(BATCH, 4, 8, 8)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(x, t).sample, t, x).prev_sample
    s = _timed(run_once, 2)
    return {"per_image_s": s / BATCH, "peak_rss_mb": _peak_mb(), "parameters": sum(p.numel() for p in unet.parameters())}


def child_ort_ceiling(run: str, steps: int, threads: int) -> dict:
    """Best GOPS onnxruntime reaches here: a large 3x3 convolution, fp32 and int8 (QDQ)."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    c, hw, n = 256, 32, 8
    w = np.random.default_rng(0).standard_normal((c, c, 3, 3)).astype(np.float32) * 0.05
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c, hw, hw])],
                              [numpy_helper.from_array(w, "w")])
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).standard_normal((n, c, hw, hw)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x}])

        def get_next(self):
            return next(self.it, None)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fp32, f"{tmp}/a.onnx")
        quantize_static(f"{tmp}/a.onnx", f"{tmp}/b.onnx", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        int8 = open(f"{tmp}/b.onnx", "rb").read()
    macs = n * c * hw * hw * c * 9
    out = {}
    for name, model in (("fp32", fp32.SerializeToString()), ("int8", int8)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        s = _timed(lambda: sess.run(None, {"x": x}), 5)
        out[f"{name}_gops"] = 2 * macs / s / 1e9
    return out


def child_denoiser_gops(bundle: str, steps: int, threads: int) -> dict:
    """Multiply-accumulates of one denoiser call (from the ONNX graph) and the GOPS achieved."""
    import onnx
    import onnxruntime as ort
    from rissole_edge.bundle import Bundle, Spec
    b = Bundle.open(bundle)
    spec = Spec.from_manifest(b.manifest)
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(b.read("denoiser.onnx")))
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    macs = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w = weights.get(dq.get(node.input[1], node.input[1]))
            y = shapes.get(node.output[0])
            if w and y:
                macs += int(np.prod(y)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            w = weights.get(dq.get(node.input[1], node.input[1]))
            y = shapes.get(node.output[0])
            if w and y:
                macs += int(np.prod(y)) * w[0]
    blocks = 256
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(b.read("denoiser.onnx"), opts, providers=["CPUExecutionProvider"])
    c, s = spec.latent_channels, spec.block_side
    feeds = {"x": np.zeros((blocks, c, s, s), np.float32), "t": np.full(blocks, 500.0, np.float32),
             "pos": np.zeros(blocks, np.int64), "cond": np.zeros((blocks, spec.k * c, s, s), np.float32)}
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    sec = _timed(lambda: sess.run(None, feeds), 10)
    return {"macs_per_block": macs, "macs_per_image_per_step": macs * spec.positions,
            "macs_per_image_50_steps": macs * spec.positions * 50, "call_blocks": blocks, "call_ms": sec * 1e3,
            "achieved_gops": 2 * macs * blocks / sec / 1e9}


CHILDREN = {f.__name__[len("child_"):]: f for f in
            (child_torch_eager, child_whole_torch, child_whole_ort, child_diffusers, child_ort_ceiling,
             child_denoiser_gops)}


def spawn(name: str, target: str, steps: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, target, str(steps), str(threads)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the run

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the training run the bundle was exported from")
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few configurations, 5 steps")
    args = parser.parse_args()
    from rissole_edge.bench import minimum_budget, run_child

    steps = 5 if args.quick else 50
    low = minimum_budget(args.bundle) // 2 ** 20
    budgets = [low, low + 16] if args.quick else [low, low + 8, low + 32, low + 128]
    sweep = []
    for budget in budgets:
        for threads in (1, 2):
            r = run_child({"bundle": str(args.bundle), "threads": threads, "steps": steps, "images": BATCH,
                           "budget": budget * 2 ** 20})
            sweep.append({"budget_mb": budget, "threads": threads, **r})
    step_sweep = []
    for s in ([5] if args.quick else [10, 25, 50, 100]):
        r = run_child({"bundle": str(args.bundle), "threads": 2, "steps": s, "images": BATCH})
        step_sweep.append({"steps": s, **r})
    ours = run_child({"bundle": str(args.bundle), "threads": 2, "steps": steps, "images": BATCH})
    peers = {name: spawn(name, str(args.run), steps, 2)
             for name in ("torch_eager", "whole_torch", "whole_ort", "diffusers")}
    limit = {**spawn("denoiser_gops", str(args.bundle), steps, 2), **spawn("ort_ceiling", "-", steps, 2)}
    ours_img = ours.get("batched_images_per_s") and 1 / ours["batched_images_per_s"]
    ratios = {f"speedup_vs_{k}": (v["per_image_s"] / ours_img) if "per_image_s" in v and ours_img else None
              for k, v in peers.items()}
    ratios["rss_ratio_torch_eager_over_ours"] = (peers["torch_eager"].get("peak_rss_mb", 0) / ours["peak_rss_mb"]
                                                 if "peak_rss_mb" in ours else None)
    ratios["gops_fraction_of_int8_ceiling"] = limit.get("achieved_gops", 0) / max(limit.get("int8_gops", 1e-9), 1e-9)
    ratios["budget_honoured_everywhere"] = all(r.get("peak_rss_mb", 1e9) <= r["budget_mb"] for r in sweep)
    result = {"steps": steps, "images_per_call": BATCH, "cpu_count": os.cpu_count(), "ours": ours, "sweep": sweep,
              "steps_sweep": step_sweep, "peers": peers, "limit": limit, "ratios": ratios}
    RESULTS.mkdir(exist_ok=True)
    name = "perf-quick" if args.quick else "perf"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.quick:
        _write_md(result)
        t2 = [r for r in sweep if r["threads"] == 2]
        _plot(RESULTS / "latency_vs_budget.png", "warm latency per image vs memory budget (2 threads)",
              [r["budget_mb"] for r in t2], {"ms/image": [r.get("warm_image_s", 0) * 1e3 for r in t2]}, "budget MB", "ms")
        _plot(RESULTS / "rss_vs_budget.png", "peak RSS vs memory budget (2 threads)", [r["budget_mb"] for r in t2],
              {"peak RSS MB": [r.get("peak_rss_mb") for r in t2], "budget MB": [r["budget_mb"] for r in t2]},
              "budget MB", "MB")
        _plot(RESULTS / "latency_vs_steps.png", "warm latency per image vs DDIM steps (2 threads)",
              [r["steps"] for r in step_sweep], {"ms/image": [r.get("warm_image_s", 0) * 1e3 for r in step_sweep]},
              "steps", "ms")
    print(json.dumps(ratios, indent=2))
    return 0


def _write_md(r: dict) -> None:
    ours, peers, limit, ratios = r["ours"], r["peers"], r["limit"], r["ratios"]
    lines = [f"# Performance ({r['steps']} DDIM steps, batches of {r['images_per_call']} images, 2 threads unless said)",
             "", "Made by `python benchmarks/perf.py --run RUN --bundle BUNDLE`; every row is its own process.", "",
             "| contender | ms per image (batched) | peak RSS MB |", "|---|---|---|",
             f"| rissole-edge runtime (int8 bundle) | {1e3 / ours['batched_images_per_s']:.1f} | {ours['peak_rss_mb']:.1f} |"]
    labels = {"torch_eager": "(a) same model, fp32, PyTorch eager", "whole_torch": "(b) whole-latent LDM, PyTorch",
              "whole_ort": "(b) whole-latent LDM, onnxruntime fp32", "diffusers": "(c) diffusers UNet2DModel + DDIM"}
    for k, v in peers.items():
        lines.append(f"| {labels[k]} | {v['per_image_s'] * 1e3:.1f} | {v['peak_rss_mb']:.1f} |" if "per_image_s" in v
                     else f"| {labels[k]} | failed: {v.get('error')} | |")
    lines += ["", f"Cold start (process start to first image): {ours['cold_s']:.2f} s, of which opening the bundle "
              f"{ours['open_s']:.3f} s and the first image {ours['first_image_s']:.3f} s.", "",
              "| budget MB | threads | ms/image warm | peak RSS MB | plan |", "|---|---|---|---|---|"]
    for s in r["sweep"]:
        lines.append(f"| {s['budget_mb']} | {s['threads']} | {s.get('warm_image_s', 0) * 1e3:.1f} | "
                     f"{s.get('peak_rss_mb', 0):.1f} | {s.get('plan', s.get('error'))} |")
    lines += ["", "| steps | ms/image warm |", "|---|---|"]
    lines += [f"| {s['steps']} | {s.get('warm_image_s', 0) * 1e3:.1f} |" for s in r["steps_sweep"]]
    lines += ["", f"Limit: one denoiser call = {limit.get('macs_per_block', 0) / 1e6:.2f} M MACs per block, "
              f"{limit.get('macs_per_image_50_steps', 0) / 1e9:.2f} G MACs per image at 50 steps. Achieved "
              f"{limit.get('achieved_gops', 0):.1f} GOPS on calls of {limit.get('call_blocks')} blocks; onnxruntime's best "
              f"here on a 256-channel 3x3 conv: {limit.get('fp32_gops', 0):.1f} GOPS fp32, {limit.get('int8_gops', 0):.1f} "
              f"GOPS int8.", "", "Ratios: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                                          for k, v in ratios.items())]
    (RESULTS / "perf.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, name, target, steps, threads = sys.argv
        print(json.dumps(CHILDREN[name](target, int(steps), int(threads))))
        sys.exit(0)
    sys.exit(main())

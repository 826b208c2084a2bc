"""Latency and memory of rissole-edge against what a user would run instead, in one run.

    python benchmarks/perf.py [--bundle models/fashion-mnist.rissole] [--config models/fashion-mnist.toml] [--quick]

Every configuration runs in its own child process (peak RSS = the child's VmHWM):
  ours    the runtime with its default thread plan, with 1 and 2 threads, over memory budgets
          (minimum .. generous) and step counts, and at the bundle's recommended sampler/steps;
  peers   (a) the same model, fp32, in PyTorch eager (the toolchain's sampler and decoder);
          (b) a whole-latent LDM of the same UNet family and parameter count, PyTorch and ORT;
          (c) diffusers UNet2DModel + DDIMScheduler of comparable size on the same latent;
          each at 1 and 2 threads, its faster figure compared;
  limit   the denoiser's true multiply-accumulates per block (export/graph.py), its GOPS on calls
          of 256 blocks on one core and on all cores, against the best GOPS onnxruntime reaches
          here on a large fp32 and int8 convolution (one core and all cores).
The peers are built from the bundle's recipe config (--config) with untrained weights: the
training runs are not kept, and speed does not depend on the weights' values.
Writes benchmarks/results/perf.json, perf.md and three PNG plots.
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
from rissole_edge.budget import rss
from rissole_edge.timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
BATCH = 8            # images per timed generation call for every contender
CALL_BLOCKS = 256    # blocks per denoiser call for the GOPS figures
PEERS = ("torch_eager", "whole_torch", "whole_ort", "diffusers")


# ------------------------------------------------------------------ children (one per process)

def _wall_and_cpu(run, repeats: int = 3) -> tuple[float, float]:
    """Median wall and process CPU seconds of `run()` after one warm-up run. At one thread the
    CPU time is the work itself, whatever share of a core the busy machine left the process:
    rows run minutes apart can be compared by it when the load moved in between."""
    run()
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus))


def _thread_cpu_seconds(call, repeats: int) -> float:
    """Median CPU seconds of the calling thread per `call()` (a single-threaded onnxruntime
    session runs every kernel there), after one warm-up call."""
    return median_seconds(call, repeats, warmup=1, clock=time.thread_time)


def _recipe(path: str):
    """A run's config: a training run's folder (its config.json), or a recipe file applied to
    the small preset (how the shipped bundles were trained)."""
    from rissole_export import config
    if Path(path).is_dir():
        return config.load(Path(path) / "config.json")
    return config.resolve("small", config.read_config_file(Path(path)))


def _geometry(bundle: str) -> tuple[int, int, int]:
    """(latent channels, latent side, blocks per side) of the bundle the peers stand beside."""
    spec = _spec(bundle)
    return spec.latent_channels, spec.latent_side, spec.blocks_per_side


def _spec(bundle: str):
    from rissole_edge.bundle import Bundle, Spec
    return Spec.from_manifest(Bundle.open(bundle).manifest)


def child_torch_eager(a: dict) -> dict:
    """The same block model (fp32, untrained weights: speed does not depend on their values)
    through the toolchain's torch sampler and decoder: noise, neighbours' blocks, DDIM over all
    blocks of the batch at once, one decoder call. Retrieval (0.7% of the runtime's time) is
    left out: the neighbour blocks are random latents."""
    import torch
    torch.set_num_threads(a["threads"])
    from rissole_edge import blocks
    from rissole_export import denoiser
    from rissole_export.autoencoder import VQAutoencoder
    from rissole_export.diffusion import Diffusion
    cfg = _recipe(a["config"])
    c, side, per_side = _geometry(a["bundle"])
    net = denoiser.build(cfg.denoiser, c, side).eval()
    ae = VQAutoencoder(_spec(a["bundle"]).image_channels, cfg.autoencoder).eval()
    diffusion = Diffusion(cfg.denoiser.schedule, cfg.denoiser.timesteps)
    s, positions = net.block_size, per_side ** 2
    rows = BATCH * positions
    pos = torch.arange(positions).repeat(BATCH)
    cond = torch.randn(rows, net.k * c, s, s) if net.k else None

    def run() -> None:
        with torch.no_grad():
            x = diffusion.sample(lambda x, t: net(x, t, pos, cond), torch.randn(rows, c, s, s), a["steps"])
            latent = blocks.join(x.reshape(BATCH, positions, c, s, s).numpy(), per_side)
            ae.decode_latent(torch.from_numpy(latent))
    sec, cpu = _wall_and_cpu(run)
    return {"per_image_s": sec / BATCH, "per_image_cpu_s": cpu / BATCH, "peak_rss_mb": rss()[1] / 2 ** 20,
            "parameters": sum(p.numel() for p in net.parameters())}


def _whole_unet(a: dict):
    from rissole_export import denoiser
    cfg = _recipe(a["config"])
    cfg.denoiser.kind = "whole"
    c, side, _ = _geometry(a["bundle"])
    return denoiser.build(cfg.denoiser, c, side).eval()


def child_whole_torch(a: dict) -> dict:
    import torch
    torch.set_num_threads(a["threads"])
    from rissole_export.diffusion import Diffusion
    net, diffusion = _whole_unet(a), Diffusion()
    pos = torch.zeros(BATCH, dtype=torch.long)
    x = torch.randn(BATCH, net.latent_channels, net.block_size, net.block_size)
    with torch.no_grad():
        sec, cpu = _wall_and_cpu(lambda: diffusion.sample(lambda x, t: net(x, t, pos), x, a["steps"]))
    return {"per_image_s": sec / BATCH, "per_image_cpu_s": cpu / BATCH, "peak_rss_mb": rss()[1] / 2 ** 20,
            "parameters": sum(p.numel() for p in net.parameters())}


def child_whole_ort(a: dict) -> dict:
    import onnxruntime as ort
    from rissole_export import onnx_export
    from rissole_edge import sampler
    from rissole_edge.schedule import alphas_cumprod
    net = _whole_unet(a)
    model = onnx_export.denoiser(net)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a["threads"]
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    alpha = alphas_cumprod("linear", 1000)

    def eps(x, t):
        feeds = {"x": x, "t": t, "pos": np.zeros(len(x), np.int64)}
        return sess.run(["eps"], {k: v for k, v in feeds.items() if k in names})[0]
    x = np.random.default_rng(0).standard_normal((BATCH, net.latent_channels, net.block_size, net.block_size))
    x = x.astype(np.float32)
    sec, cpu = _wall_and_cpu(lambda: sampler.sample(eps, x, alpha, a["steps"], "ddim"))
    return {"per_image_s": sec / BATCH, "per_image_cpu_s": cpu / BATCH, "peak_rss_mb": rss()[1] / 2 ** 20}


def child_diffusers(a: dict) -> dict:
    import torch
    torch.set_num_threads(a["threads"])
    from diffusers import DDIMScheduler, UNet2DModel
    c, side, _ = _geometry(a["bundle"])
    unet = UNet2DModel(sample_size=side, in_channels=c, out_channels=c, block_out_channels=(40, 80),
                       layers_per_block=2, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")

    def run_once():
        sched.set_timesteps(a["steps"])
        x = torch.randn(BATCH, c, side, side)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(x, t).sample, t, x).prev_sample
    sec, cpu = _wall_and_cpu(run_once)
    return {"per_image_s": sec / BATCH, "per_image_cpu_s": cpu / BATCH, "peak_rss_mb": rss()[1] / 2 ** 20,
            "parameters": sum(p.numel() for p in unet.parameters())}


def child_ort_ceiling(a: dict) -> dict:
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
        opts.intra_op_num_threads = a["threads"]
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        out[f"{name}_gops"] = 2 * macs / median_seconds(lambda: sess.run(None, {"x": x}), 5, warmup=1) / 1e9
        if a["threads"] == 1:
            out[f"{name}_gops_cpu"] = 2 * macs / _thread_cpu_seconds(lambda: sess.run(None, {"x": x}), 5) / 1e9
    return out


def child_denoiser_gops(a: dict) -> dict:
    """GOPS of the shipped denoiser on calls of CALL_BLOCKS blocks: one thread, and all cores
    (one Python thread per core, each running its share of the blocks on a single-threaded
    session of its own: onnxruntime releases the GIL; how the runtime spreads blocks over cores). MACs are
    the layers' true count (graph.node_macs, recorded in the manifest at rewrite time), and the
    count the rewritten graph executes (no padding taps in its GEMMs)."""
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort
    from rissole_edge import workers
    from rissole_edge.bundle import Bundle, Spec
    from rissole_export import graph
    b = Bundle.open(a["bundle"])
    spec = Spec.from_manifest(b.manifest)
    model = b.read("denoiser.onnx")
    record = b.manifest.get("graph") or {}
    executed = sum(graph.node_macs(model).values())
    layers = record.get("denoiser_macs_per_block", executed)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    def make() -> ort.InferenceSession:        # as the runtime runs it
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=workers.DISABLED_OPTIMIZERS)
    sess = make()
    c, s = spec.latent_channels, spec.block_side
    feeds = {"x": np.zeros((CALL_BLOCKS, c, s, s), np.float32), "t": np.full(CALL_BLOCKS, 500.0, np.float32),
             "pos": np.zeros(CALL_BLOCKS, np.int64), "cond": np.zeros((CALL_BLOCKS, spec.k * c, s, s), np.float32)}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}
    cores = os.cpu_count() or 1
    share = -(-CALL_BLOCKS // cores)
    parts = [{k: v[i:i + share] for k, v in feeds.items()} for i in range(0, CALL_BLOCKS, share)]
    one = median_seconds(lambda: sess.run(["eps"], feeds), 10)
    one_cpu = _thread_cpu_seconds(lambda: sess.run(["eps"], feeds), 10)
    own = [sess] + [make() for _ in parts[1:]]         # a session per worker, as the runtime's workers.Sessions
    with ThreadPoolExecutor(cores) as pool:
        every = median_seconds(lambda: list(pool.map(lambda m, f: m.run(["eps"], f), own, parts)), 10)
    return {"macs_per_block": layers, "executed_macs_per_block": executed, "call_blocks": CALL_BLOCKS,
            "macs_per_image_per_step": layers * spec.positions, "cores": cores,
            "call_ms_1_thread": one * 1e3, "call_ms_all_cores": every * 1e3, "call_cpu_ms_1_thread": one_cpu * 1e3,
            "gops_1_thread_cpu": 2 * layers * CALL_BLOCKS / one_cpu / 1e9,
            "gops_1_thread": 2 * layers * CALL_BLOCKS / one / 1e9,
            "gops_all_cores": 2 * layers * CALL_BLOCKS / every / 1e9,
            "executed_gops_1_thread": 2 * executed * CALL_BLOCKS / one / 1e9,
            "executed_gops_all_cores": 2 * executed * CALL_BLOCKS / every / 1e9}


CHILDREN = {f.__name__[len("child_"):]: f for f in
            (child_torch_eager, child_whole_torch, child_whole_ort, child_diffusers, child_ort_ceiling,
             child_denoiser_gops)}


def spawn(name: str, **args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, json.dumps(args)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.get("threads", 1))})
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the run

def _ms_per_image(r: dict) -> float | None:
    return 1e3 / r["batched_images_per_s"] if r.get("batched_images_per_s") else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "fashion-mnist.rissole")
    parser.add_argument("--config", type=Path, default=ROOT / "models" / "fashion-mnist.toml",
                        help="the peers' architecture: the bundle's recipe (preset small + this file) or a run folder")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few configurations, 5 steps")
    args = parser.parse_args()
    from rissole_edge.bench import minimum_budget, run_child

    steps = 5 if args.quick else 50
    bundle = str(args.bundle)
    load_at_start = os.getloadavg()

    def ours_child(**cfg) -> dict:
        return run_child({"bundle": bundle, "threads": None, "steps": steps, "images": BATCH, **cfg})
    low = minimum_budget(args.bundle) // 2 ** 20
    sweep = [{"budget_mb": b, **ours_child(budget=b * 2 ** 20)}
             for b in ([low, low + 16] if args.quick else [low, low + 8, low + 32, low + 128])]
    threads = [{"threads": t or "default", **ours_child(threads=t)} for t in (1, 2, None)]
    # The thread options against each other in one process, interleaved round by round (each
    # row above is its own process, run minutes apart on a machine whose load moves).
    plans = run_child({"bundle": bundle, "plans": True, "steps": steps, "rounds": 2 if args.quick else 15,
                       "sizes": [1, BATCH] if args.quick else [1, BATCH, 64], "rows": [CALL_BLOCKS]})
    step_sweep = [{"steps": s, **ours_child(steps=s)} for s in ([5] if args.quick else [10, 25, 50, 100])]
    spec = _spec(bundle)
    recommended = {"sampler": spec.sampler, "steps": spec.steps, **ours_child(steps=None)}
    ours = threads[-1]
    peers = {name: {str(t): spawn(name, bundle=bundle, config=str(args.config), steps=steps, threads=t) for t in (1, 2)}
             for name in PEERS}
    cores = os.cpu_count() or 1
    limit = {**spawn("denoiser_gops", bundle=bundle, threads=1),
             "ceiling_1_core": spawn("ort_ceiling", threads=1), "ceiling_all_cores": spawn("ort_ceiling", threads=cores)}
    by_plan = plans.get("generate_ms_per_image", {}).get(f"n={BATCH} ({BATCH * _spec(bundle).positions} blocks)")
    ours_ms = by_plan["median"]["default"] if by_plan else _ms_per_image(ours)
    ratios: dict = {}
    ours_cpu = by_plan["cpu_median"]["1 thread"] if by_plan else None
    for name, by_threads in peers.items():
        times = [v["per_image_s"] * 1e3 for v in by_threads.values() if "per_image_s" in v]
        ratios[f"speedup_vs_{name}"] = min(times) / ours_ms if times and ours_ms else None
        cpu = by_threads["1"].get("per_image_cpu_s")
        ratios[f"cpu_time_ratio_1_thread_vs_{name}"] = cpu * 1e3 / ours_cpu if cpu and ours_cpu else None
    int8_1, int8_all = limit["ceiling_1_core"].get("int8_gops"), limit["ceiling_all_cores"].get("int8_gops")
    if "gops_1_thread" in limit and int8_1 and int8_all:
        ratios["gops_share_of_int8_peak_1_core"] = limit["gops_1_thread"] / int8_1
        ratios["gops_share_of_int8_peak_all_cores"] = limit["gops_all_cores"] / int8_all
    if limit.get("gops_1_thread_cpu") and limit["ceiling_1_core"].get("int8_gops_cpu"):
        ratios["gops_share_of_int8_peak_1_core_cpu_time"] = \
            limit["gops_1_thread_cpu"] / limit["ceiling_1_core"]["int8_gops_cpu"]
    ran = [r for r in sweep if "peak_rss_mb" in r]
    if "calls_ms" in plans:
        ratios["two_workers_vs_one_thread_at_256_blocks"] = \
            plans["calls_ms"][f"{CALL_BLOCKS} rows"]["speedup_over_1_thread"]["2 workers on halves"]
        ratios["default_plan_fastest_at_every_size"] = all(
            row.get("default_is_fastest", False) for row in plans["generate_ms_per_image"].values())
    ratios["budget_honoured_where_it_ran"] = all(r["peak_rss_mb"] <= r["budget_mb"] for r in ran)
    ratios["budget_rows_refused"] = len(sweep) - len(ran)
    result = {"steps": steps, "images_per_call": BATCH, "cpu_count": cores, "ours": ours, "threads": threads,
              "plans": plans, "load_average_at_start": load_at_start,
              "sweep": sweep, "steps_sweep": step_sweep, "recommended": recommended, "peers": peers, "limit": limit,
              "ratios": ratios, "command": "python benchmarks/perf.py " + " ".join(sys.argv[1:]),
              "load_average_at_end": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    name = "perf-quick" if args.quick else "perf"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.quick:
        _write_md(result)
        _plot(RESULTS / "latency_vs_budget.png", "warm latency per image vs memory budget (default threads)",
              [r["budget_mb"] for r in sweep], {"ms/image": [r.get("warm_image_s", 0) * 1e3 for r in sweep],
                                                "CPU ms/image": [r.get("warm_image_cpu_s", 0) * 1e3 for r in sweep]},
              "budget MB", "ms")
        _plot(RESULTS / "rss_vs_budget.png", "peak RSS vs memory budget (default threads)",
              [r["budget_mb"] for r in sweep],
              {"peak RSS MB": [r.get("peak_rss_mb") for r in sweep], "budget MB": [r["budget_mb"] for r in sweep]},
              "budget MB", "MB")
        _plot(RESULTS / "latency_vs_steps.png", "warm latency per image vs steps (default threads)",
              [r["steps"] for r in step_sweep], {"ms/image": [r.get("warm_image_s", 0) * 1e3 for r in step_sweep],
                                                 "CPU ms/image": [r.get("warm_image_cpu_s", 0) * 1e3 for r in step_sweep]},
              "steps", "ms")
    print(json.dumps(ratios, indent=2))
    return 0


def _fmt(v, spec: str = ".1f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _warm_ms(r: dict) -> float | None:
    return r["warm_image_s"] * 1e3 if "warm_image_s" in r else None


def _warm_cpu_ms(r: dict) -> float | None:
    """Process CPU time per warm image: steadier than wall time on the busy machine."""
    return r["warm_image_cpu_s"] * 1e3 if "warm_image_cpu_s" in r else None


def _thread_lines(plans: dict) -> list[str]:
    """The interleaved thread-plan comparison as tables (bench's `_plans` child)."""
    if "generate_ms_per_image" not in plans:
        return [f"The thread-plan comparison failed: {plans.get('error')}"]
    lines = ["| images per call | 1 thread | 2 threads | default plan | the default ran as | default vs the plan it did not choose |",
             "|---|---|---|---|---|---|"]
    for size, row in plans["generate_ms_per_image"].items():
        m, x = row["median"], row["speedup_over_1_thread"]
        lines.append(f"| {size} | {m['1 thread']:.1f} | {m['2 threads']:.1f} ({x['2 threads']:.2f}x) | "
                     f"{m['default']:.1f} ({x['default']:.2f}x) | {row.get('default_is', '-')} "
                     f"(workers per round: {row['default_workers']}) | {_fmt(row.get('default_vs_the_other_plan'), '.2f')}x |")
    lines += ["", "| one denoiser call | 1 thread | 2 intra-op threads | 2 workers on halves (a session each) |",
              "|---|---|---|---|"]
    for size, row in plans["calls_ms"].items():
        m, x = row["median"], row["speedup_over_1_thread"]
        lines.append(f"| {size} | {m['1 thread']:.2f} ms | {m['2 intra-op threads']:.2f} ms "
                     f"({x['2 intra-op threads']:.2f}x) | {m['2 workers on halves']:.2f} ms ({x['2 workers on halves']:.2f}x) |")
    return lines


def _write_md(r: dict) -> None:
    ours, peers, limit, ratios = r["ours"], r["peers"], r["limit"], r["ratios"]
    by_plan = next((row["median"] for size, row in r["plans"].get("generate_ms_per_image", {}).items()
                    if size.startswith(f"n={r['images_per_call']} ")), None)
    ms = [by_plan[k] for k in ("1 thread", "2 threads", "default")] if by_plan else \
        [_ms_per_image(x) for x in r["threads"]]
    cpu_1 = next((row["cpu_median"]["1 thread"] for size, row in r["plans"].get("generate_ms_per_image", {}).items()
                  if size.startswith(f"n={r['images_per_call']} ")), None)
    load = f"load average {r['load_average_at_start'][0]:.1f} at the start, {r['load_average_at_end'][0]:.1f} at the end"
    lines = [f"# Performance ({r['steps']} sampling steps, batches of {r['images_per_call']} images)", "",
             f"Made by `{r['command']}` on a shared {r['cpu_count']}-core x86_64 machine that other work was using "
             f"({load}): compare ratios from this one run, not milliseconds across runs. The runtime's three thread "
             "options were timed in one process, interleaved round by round (medians); every other row is its own "
             "process. The peers are built from the bundle's recipe "
             "config with untrained weights (speed does not depend on weight values; the training runs are not kept); "
             "each ran at 1 and 2 threads and its faster figure is compared. The peers sample with DDIM; the runtime with "
             f"the bundle's recommended sampler ({r['recommended'].get('sampler')}) at the same step count: one denoiser "
             "call per step either way.", "",
             "The last two columns compare CPU time at one thread (the process's CPU seconds per image): the work "
             "itself, whatever share of a core the machine's other jobs left each row when it ran.", "",
             "| contender | ms per image, 1 thread | ms per image, 2 threads | peak RSS MB (ours: default plan; peers: 2 threads) | "
             "ours is faster by | CPU ms per image, 1 thread | ours takes less CPU by |", "|---|---|---|---|---|---|---|",
             f"| **rissole-edge runtime** (int8 bundle, default thread plan: {_fmt(ms[2])} ms) | "
             f"{_fmt(ms[0])} | {_fmt(ms[1])} | {_fmt(ours.get('peak_rss_mb'))} | | {_fmt(cpu_1)} | |"]
    labels = {"torch_eager": "(a) same model, fp32, PyTorch eager", "whole_torch": "(b) whole-latent LDM, PyTorch",
              "whole_ort": "(b) whole-latent LDM, onnxruntime fp32", "diffusers": "(c) diffusers UNet2DModel + DDIM"}
    for k, v in peers.items():
        ms = [v[t].get("per_image_s", 0) * 1e3 or None for t in ("1", "2")]
        err = next((x["error"] for x in v.values() if "error" in x), "")
        cpu = v["1"].get("per_image_cpu_s")
        lines.append(f"| {labels[k]} | {_fmt(ms[0])} | {_fmt(ms[1])} | {_fmt(v['2'].get('peak_rss_mb'))} | "
                     f"{_fmt(ratios.get(f'speedup_vs_{k}'), '.2f')}x {err} | {_fmt(cpu * 1e3 if cpu else None)} | "
                     f"{_fmt(ratios.get(f'cpu_time_ratio_1_thread_vs_{k}'), '.2f')}x |")
    rec = r["recommended"]
    lines += ["", "## Threads", "", "ms per image (speed-up over 1 thread), one process, interleaved rounds:", "",
              *_thread_lines(r["plans"])]
    lines += ["", f"The whole pipeline at the bundle's recommended sampler and steps ({rec['sampler']}, {rec['steps']} "
              "steps): "
              f"{_fmt(_ms_per_image(rec))} ms per image batched, {_fmt(_warm_ms(rec))} ms one "
              "image warm.", "",
              f"Cold start (process start to first image): {_fmt(ours.get('cold_s'), '.2f')} s, of which opening the "
              f"bundle {_fmt(ours.get('open_s'), '.3f')} s and the first image {_fmt(ours.get('first_image_s'), '.3f')} s.",
              "", "| budget MB | ms/image warm | CPU ms/image warm | peak RSS MB | plan |", "|---|---|---|---|---|"]
    for s in r["sweep"]:
        lines.append(f"| {s['budget_mb']} | {_fmt(_warm_ms(s))} | {_fmt(_warm_cpu_ms(s))} | {_fmt(s.get('peak_rss_mb'))} | "
                     f"{s.get('plan', s.get('error'))} |")
    lines += ["", "| steps | ms/image warm | CPU ms/image warm |", "|---|---|---|"]
    lines += [f"| {s['steps']} | {_fmt(_warm_ms(s))} | {_fmt(_warm_cpu_ms(s))} |" for s in r["steps_sweep"]]
    c1, call = limit.get("ceiling_1_core", {}), limit.get("ceiling_all_cores", {})
    lines += ["", "## Limit", "",
              f"One denoiser call costs {_fmt(limit.get('macs_per_block', 0) / 1e6, '.2f')} M MACs per block as its "
              "layers define them (export/graph.py counts them from the shapes of one run; ONNX shape inference "
              "loses the shapes after the GroupNorm reshapes), of which the rewritten graph executes "
              f"{_fmt(limit.get('executed_macs_per_block', 0) / 1e6, '.2f')} M (its GEMMs skip the padding taps).", "",
              f"| calls of {limit.get('call_blocks')} blocks | call ms | GOPS (layer MACs) | GOPS (executed MACs) | "
              "onnxruntime's best int8 GOPS here (256-ch 3x3 conv) | share of that peak |", "|---|---|---|---|---|---|",
              f"| one core | {_fmt(limit.get('call_ms_1_thread'))} | {_fmt(limit.get('gops_1_thread'))} | "
              f"{_fmt(limit.get('executed_gops_1_thread'))} | {_fmt(c1.get('int8_gops'))} | "
              f"{_fmt(ratios.get('gops_share_of_int8_peak_1_core', 0) * 100, '.0f')}% |",
              f"| all {limit.get('cores')} cores (a thread per core on its share of the blocks) | {_fmt(limit.get('call_ms_all_cores'))} | "
              f"{_fmt(limit.get('gops_all_cores'))} | {_fmt(limit.get('executed_gops_all_cores'))} | "
              f"{_fmt(call.get('int8_gops'))} | {_fmt(ratios.get('gops_share_of_int8_peak_all_cores', 0) * 100, '.0f')}% |",
              f"| one core, CPU time of the calling thread (both sides) | {_fmt(limit.get('call_cpu_ms_1_thread'))} | "
              f"{_fmt(limit.get('gops_1_thread_cpu'))} | | {_fmt(c1.get('int8_gops_cpu'))} | "
              f"{_fmt((ratios.get('gops_share_of_int8_peak_1_core_cpu_time') or 0) * 100, '.0f')}% |",
              "", f"fp32 peak on the same conv: {_fmt(c1.get('fp32_gops'))} GOPS on one core, "
              f"{_fmt(call.get('fp32_gops'))} on all cores.", "",
              "Ratios: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in ratios.items())]
    (RESULTS / "perf.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main())

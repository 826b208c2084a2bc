"""`rissole-edge bench`: latency and memory of generation, and the thread plans against the
options they choose between.

Each configuration runs in its own child process (`python -m rissole_edge.bench CONFIG_JSON`,
one JSON line out) so that the peak RSS the OS reports belongs to that configuration alone.
The thread-plan comparison runs in one child instead, in interleaved rounds, so that a busy
machine slows every option alike: for each group size, the default plan against 1 and 2
worker threads, and for single denoiser calls, one thread against 2 intra-op threads and 2
workers on halves (the options workers.py chooses between).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()

from . import budget  # noqa: E402  (START must be taken before the heavy imports)
from .timing import median_seconds  # noqa: E402


def _child(cfg: dict) -> dict:
    import numpy as np

    from .generator import Generator
    imported = time.perf_counter()
    out: dict = {"config": cfg}
    gen = Generator.open(cfg["bundle"], memory_budget=cfg.get("budget"), threads=cfg["threads"])
    opened = time.perf_counter()
    settings = {"steps": cfg["steps"], "sampler_name": cfg.get("sampler"), "as_array": True}  # no "sampler": the bundle's
    gen.generate(1, seed=0, **settings)
    first = time.perf_counter()
    out.update(import_s=imported - START, open_s=opened - imported, first_image_s=first - opened,
               cold_s=first - START, plan=gen.plan.describe())
    n = cfg["images"]
    times = []
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        gen.generate(1, seed=1, first_index=i, **settings)
        times.append(time.perf_counter() - t0)
    out["warm_image_s"] = float(np.median(times))
    out["warm_image_cpu_s"] = (time.process_time() - cpu0) / n    # all threads
    batched = median_seconds(lambda: gen.generate(n, seed=2, **settings), 3, warmup=0)
    out["batched_images_per_s"] = n / batched
    gen.close()
    out["peak_rss_mb"] = budget.rss()[1] / 2 ** 20
    return out


def _plans(cfg: dict) -> dict:
    """The default thread plan against the options it chooses between, interleaved rounds. Every
    option first generates each size once, untimed, so that the rounds time warm Generators:
    a forced 2 threads makes its second session in its first group, the default plan once its
    groups' savings have paid for it (workers.Sessions.worth_growing: after the largest size
    here), and neither making is in the rounds. (A one-shot run of a few images never makes it:
    one thread is then the faster option, by the making time.)"""
    import onnxruntime as ort

    from . import workers
    from .generator import Generator

    options = {"1 thread": 1, "2 threads": 2, "default": None}
    gens = {name: Generator.open(cfg["bundle"], threads=t) for name, t in options.items()}
    spec, rounds = gens["default"].spec, cfg["rounds"]
    out: dict = {"config": cfg, "cores": workers.cores(), "generate_ms_per_image": {}, "calls_ms": {}}
    for n in cfg["sizes"]:
        for gen in gens.values():
            gen.generate(n, seed=0, steps=cfg["steps"], as_array=True)
    out["default_sessions"] = len(gens["default"]._denoisers)
    for n in cfg["sizes"]:
        times: dict[str, list[float]] = {name: [] for name in gens}
        cpu: dict[str, list[float]] = {name: [] for name in gens}
        chosen = []
        for r in range(rounds):
            # The order turns each round, so that no option always runs right after the 2-thread
            # one (whose extra CPU time the scheduler then gives back to the other jobs).
            order = list(gens)[r % len(gens):] + list(gens)[:r % len(gens)]
            for name, gen in ((name, gens[name]) for name in order):
                c0, t0 = time.process_time(), time.perf_counter()
                gen.generate(n, seed=r, steps=cfg["steps"], as_array=True)
                times[name].append((time.perf_counter() - t0) * 1e3 / n)
                cpu[name].append((time.process_time() - c0) * 1e3 / n)
            chosen.append(gens["default"].last_workers)
        row = _default_summary(times, chosen)
        # CPU time of all the process's threads: at 1 thread the work itself, whatever share of
        # a core the machine's other jobs left (comparable across processes run at other times).
        row["cpu_median"] = {k: round(statistics.median(v), 4) for k, v in cpu.items()}
        out["generate_ms_per_image"][f"n={n} ({n * spec.positions} blocks)"] = row

    one = gens["1 thread"].denoiser                 # every Generator's sessions are single-threaded
    inputs = {i.name for i in one.get_inputs()}
    threaded = ort.SessionOptions()
    threaded.intra_op_num_threads = 2
    intra = ort.InferenceSession(gens["1 thread"].bundle.read("denoiser.onnx"), threaded,
                                 providers=["CPUExecutionProvider"])
    other = workers.session(gens["1 thread"].bundle, "denoiser.onnx")    # the second worker's own, as in generation
    for asked in cfg["rows"]:    # whole items of the graph, at least one for each half
        rows = max(spec.whole_items(asked), 2 * spec.rows_per_item)
        feeds = workers.dummy_feeds(spec, rows, inputs)
        half = spec.whole_items(-(-rows // 2))
        halves = [{k: v[a:a + half] for k, v in feeds.items()} for a in (0, half)]
        repeats = max(5, 2000 // rows)

        def calls(work: list[tuple[ort.InferenceSession, dict]], threads: int) -> None:
            """As generation runs them: one handover per many calls."""
            workers.run(lambda job: [job[0].run(["eps"], job[1]) for _ in range(repeats)], work, threads)

        contenders = {"1 thread": lambda: calls([(one, feeds)], 1), "2 intra-op threads": lambda: calls([(intra, feeds)], 1),
                      "2 workers on halves": lambda: calls([(one, halves[0]), (other, halves[1])], 2)}
        times = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, run in contenders.items():
                times[name].append(median_seconds(run, 1, warmup=1) * 1e3 / repeats)
        out["calls_ms"][f"{rows} rows"] = _summary(times)
    for gen in gens.values():
        gen.close()
    return out


def _summary(times: dict[str, list[float]]) -> dict:
    """Median per option, each one's speed-up over 1 thread, and the fastest."""
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"median": {k: round(v, 4) for k, v in median.items()},
            "speedup_over_1_thread": {k: round(median["1 thread"] / v, 3) for k, v in median.items()},
            "fastest": min(median, key=median.get)}


def _default_summary(times: dict[str, list[float]], chosen: list[int]) -> dict:
    """`_summary`, and whether the default plan was the fastest option. The default runs one
    of the forced plans (the workers it chose each round are in `chosen`), so its rounds and
    that plan's are timings of the same thing: they are pooled, and the pool is compared with
    the plan it did not choose. Comparing the default with its own twin would only say which
    of two equal runs the machine's noise favoured."""
    out = _summary(times)
    same = {1: "1 thread", 2: "2 threads"}.get(statistics.mode(chosen))
    out["default_workers"] = chosen
    if same is not None:
        pooled = statistics.median(times["default"] + times[same])
        other = min(statistics.median(t) for name, t in times.items() if name not in ("default", same))
        out["default_is"] = same
        out["default_is_fastest"] = pooled <= other
        out["default_vs_the_other_plan"] = round(other / pooled, 3)
    return out


def run_child(cfg: dict, timeout: float = 900) -> dict:
    """Run one configuration in a fresh interpreter and return what it measured."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rissole_edge.bench", json.dumps(cfg)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        return {"config": cfg, "error": lines[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - t0
    return result


def bench(bundle: Path, quick: bool = False) -> dict:
    """Per-process rows (the default plan, 1 and 2 threads, and not quick the minimum memory
    budget) and the interleaved thread-plan comparison."""
    from .bundle import Bundle, Spec

    steps, images = (5, 2) if quick else (50, 8)
    steps = Spec.from_manifest(Bundle.open(bundle).manifest).distilled_steps or steps   # the only count it runs
    configs = [{"bundle": str(bundle), "threads": t, "steps": steps, "images": images} for t in (None, 1, 2)]
    if not quick:
        configs.append({"bundle": str(bundle), "threads": None, "steps": steps, "images": images,
                        "budget": minimum_budget(bundle)})
    plans = {"bundle": str(bundle), "plans": True, "steps": steps, "rounds": 2 if quick else 5,
             "sizes": [1, 16] if quick else [1, 4, 8, 16, 64], "rows": [16, 256] if quick else [4, 16, 64, 256]}
    return {"configs": [run_child(cfg) for cfg in configs], "plans": run_child(plans)}


def lines(results: dict) -> list[str]:
    """`bench`'s report as text, one line per configuration, size and call."""
    out = []
    for r in results["configs"]:
        c = r["config"]
        name = (f"threads={c['threads'] or 'default'} steps={c['steps']}"
                + (f" budget={c['budget'] / 2 ** 20:.0f}MB" if c.get("budget") else ""))
        if "error" in r:
            out.append(f"{name}: failed: {r['error']}")
            continue
        out.append(f"{name}: cold {r['cold_s']:.2f} s (open {r['open_s']:.3f} s), warm {r['warm_image_s'] * 1e3:.0f} "
                   f"ms/image (CPU {r['warm_image_cpu_s'] * 1e3:.0f} ms), batched {r['batched_images_per_s']:.1f} "
                   f"images/s, peak RSS {r['peak_rss_mb']:.1f} MB ({r['plan']})")
    plans = results["plans"]
    if "error" in plans:
        return out + [f"thread plans: failed: {plans['error']}"]
    out.append(f"thread plans on {plans['cores']} cores, medians of interleaved rounds (speed-up over 1 thread):")
    for kind, unit in (("generate_ms_per_image", "ms/image"), ("calls_ms", "ms/call")):
        for size, row in plans[kind].items():
            cells = ", ".join(f"{name} {row['median'][name]:.2f} {unit} ({row['speedup_over_1_thread'][name]:.2f}x)"
                              for name in row["median"])
            verdict = f"fastest: {row['fastest']}"
            if "default_is" in row:
                verdict += (f"; the default ran as {row['default_is']}, "
                            f"{row['default_vs_the_other_plan']:.2f}x the other plan's speed")
            out.append(f"  {size}: {cells}; {verdict}")
    return out


def minimum_budget(bundle: Path) -> int:
    """The smallest budget in whole MB that the runtime accepts for this bundle (in bytes):
    the figure its refusal names."""
    from .bundle import Bundle, Spec

    b = Bundle.open(bundle)
    spec = Spec.from_manifest(b.manifest)
    least = budget.minimum(spec, budget.fixed(b), budget.passes(spec, spec.guidance))
    return -(-least // budget.MiB) * budget.MiB


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    print(json.dumps(_plans(config) if config.get("plans") else _child(config)))

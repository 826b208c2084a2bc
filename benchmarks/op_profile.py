"""Where one denoiser call spends its time, before and after each graph rewrite.

    python benchmarks/op_profile.py [--bundle models/fashion-mnist.rissole ...] [--git-rev REV]
                                    [--blocks 256] [--rounds 15] [--markdown benchmarks/results/profile.md]

--git-rev takes the shipped bundles as committed at REV (e.g. 3055a17, before the shipped
bundles were rewritten), so that the "before" tables can be made again at any time (the
twemoji.rissole of 3055a17 is today's twemoji-teacher: the same denoiser geometry as the
4-step twemoji student shipped now).

For each bundle's denoiser: the graph as shipped, each rewrite of export/graph.py on its own,
and all of the default rewrites together. Each variant gets onnxruntime's profiler (one
intra-op thread, calls of --blocks blocks) for its per-op-type share of kernel time, and a
call time measured without the profiler, the variants interleaved round by round so that the
ratios share the machine's load. Prints JSON; --markdown also writes the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rissole_edge import workers
from rissole_edge.bundle import Bundle, Spec
from rissole_export import graph

MODELS = Path(__file__).resolve().parents[1] / "models"
PROFILED_CALLS = 15


def call_feeds(spec: Spec, blocks: int, names: set[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of one call of `blocks` blocks, for the graph inputs in `names`."""
    rng = np.random.default_rng(seed)
    c, s = spec.latent_channels, spec.block_side
    feeds = {"x": rng.standard_normal((blocks, c, s, s)).astype(np.float32),
             "t": rng.uniform(0, spec.timesteps - 1, blocks).astype(np.float32),
             "pos": rng.integers(0, spec.positions, blocks).astype(np.int64),
             "cond": rng.standard_normal((blocks, spec.k * c, s, s)).astype(np.float32)}
    return {k: v for k, v in feeds.items() if k in names}


def _session(model: bytes, profile_dir: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=workers.DISABLED_OPTIMIZERS)   # as the runtime runs it


def _kind(event: dict) -> str:
    """The op type a kernel ran as; the GroupNorm affine Mul/Add are named apart (the issue's
    suspect), as are the Gemm the conv rewrite makes."""
    op = event["args"]["op_name"]
    if op in ("Mul", "Add") and "/norm" in event["name"]:
        return f"{op} (GroupNorm gamma/beta)"
    return op


def op_shares(model: bytes, feeds: dict) -> dict:
    """Per-op-type share of kernel time, and the kernels' share of the whole call (the rest
    is the executor between kernels). Each kernel counts with its median over PROFILED_CALLS
    calls, so that a call slowed by other work on the machine does not skew the shares."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(model, tmp)
        sess.run(None, feeds)                       # warm-up, dropped below
        for _ in range(PROFILED_CALLS):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]
    first = runs[0]["ts"]
    per_kernel: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            per_kernel[(_kind(e), e["name"])].append(e["dur"])
    by_kind: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for (kind, _), durations in per_kernel.items():
        by_kind[kind] += float(np.median(durations))
        counts[kind] += 1
    total = sum(by_kind.values())
    call = float(np.median([r["dur"] for r in runs]))
    return {"kernel_share_of_call": total / call, "kernels_per_call": len(per_kernel),
            "ops": {k: {"share": v / total, "kernels_per_call": counts[k]}
                    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


def call_times(models: dict[str, bytes], feeds: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant, interleaved round by round, in CPU time of
    the calling thread (the sessions are single-threaded: every kernel runs there). On the
    busy shared machine wall time also counts the time the scheduler gave other processes,
    which moved single-rewrite ratios by 5-10% between runs minutes apart."""
    sessions = {k: _session(m) for k, m in models.items()}
    for s in sessions.values():
        s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.thread_time()
            s.run(None, feeds)
            times[k].append(time.thread_time() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def profile_bundle(path: Path, blocks: int, rounds: int) -> dict:
    bundle = Bundle.open(path)
    spec = Spec.from_manifest(bundle.manifest)
    shipped = bundle.read("denoiser.onnx")
    shapes = graph.value_shapes(shipped)
    variants = {"as shipped": shipped}
    variants.update({name: graph.REWRITES[name](shipped, shapes) for name in graph.DEFAULT_REWRITES})
    variants["all default rewrites"] = graph.rewrite(shipped)
    # Each rewrite's worth on top of the others: every default rewrite but that one (timed
    # only; the share tables keep to the variants above).
    without = {f"all but {name}": graph.rewrite(shipped, [n for n in graph.DEFAULT_REWRITES if n != name])
               for name in graph.DEFAULT_REWRITES}
    feeds = call_feeds(spec, blocks, {i.name for i in _session(shipped).get_inputs()})
    reference = _session(shipped).run(None, feeds)[0]
    times = call_times({**variants, **without}, feeds, rounds)
    everything = times["all default rewrites"]
    leave_one_out = {name: {"call_ms": times[name] * 1e3, "ratio_to_all": everything / times[name]}
                     for name in without}
    out = {}
    for name, model in variants.items():
        same = np.array_equal(reference, _session(model).run(None, feeds)[0])
        out[name] = {"unchanged": name != "as shipped" and model == shipped, "call_ms": times[name] * 1e3,
                     "ratio_to_shipped": times[name] / times["as shipped"], "bit_identical": bool(same), "onnx_bytes": len(model), **op_shares(model, feeds)}
    record = bundle.manifest.get("graph", {})
    return {"bundle": path.name, "rewrites_already_applied": record.get("denoiser_rewrites", []),
            "blocks_per_call": blocks,
            "macs_per_block": record.get("denoiser_macs_per_block") or sum(graph.node_macs(shipped, shapes).values()),
            "variants": out, "leave_one_out": leave_one_out}


def markdown(results: list[dict], command: str, load: tuple[float, float]) -> str:
    lines = ["# Where a denoiser call spends its time", "",
             f"Made by `{command}` (prints JSON); one intra-op thread, calls of "
             f"{results[0]['blocks_per_call']} blocks; call times are medians of interleaved rounds, in CPU time of the "
             "calling thread, on a "
             f"shared 2-core machine (other work was running, load average {load[0]:.1f} at the start and "
             f"{load[1]:.1f} at the end: compare the ratios, not the milliseconds). "
             "Shares are of onnxruntime's profiled kernel time (each kernel's median over "
             f"{PROFILED_CALLS} calls). Every rewrite is bit-identical (checked here and in tests/test_graph.py).", ""]
    for r in results:
        lines += [f"## {Path(r['bundle']).name}", "",
                  f"{r['macs_per_block'] / 1e6:.2f} M MACs per block per call.", "",
                  "| variant | call ms (CPU) | ratio | bit-identical | ONNX bytes |", "|---|---|---|---|---|"]
        for name, v in r["variants"].items():
            label = f"{name} (nothing to rewrite: the same graph)" if v["unchanged"] else name
            lines.append(f"| {label} | {v['call_ms']:.1f} | {v['ratio_to_shipped']:.2f} | {v['bit_identical']} | "
                         f"{v['onnx_bytes']:,} |")
        lines += ["", "Each rewrite on top of the others: all default rewrites against all but that one "
                  "(ratio below 1: the rewrite pays).", "", "| left out | call ms (CPU) | all / this |", "|---|---|---|"]
        lines += [f"| {name} | {v['call_ms']:.1f} | {v['ratio_to_all']:.3f} |" for name, v in r["leave_one_out"].items()]
        kinds = list(dict.fromkeys(k for v in r["variants"].values() for k in v["ops"]))
        names = list(r["variants"])
        lines += ["", "Share of kernel time by op type (kernels per call in brackets):", "",
                  "| op | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for kind in kinds:
            cells = []
            for name in names:
                op = r["variants"][name]["ops"].get(kind)
                cells.append(f"{op['share']:.1%} ({op['kernels_per_call']})" if op else "-")
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _from_git(rev: str, bundle: Path, folder: Path) -> Path:
    """The bundle's file as committed at `rev`, written into `folder`."""
    relative = bundle.resolve().relative_to(MODELS.parent)
    out = folder / bundle.name
    out.write_bytes(subprocess.run(["git", "show", f"{rev}:{relative}"], cwd=MODELS.parent, check=True,
                                   capture_output=True).stdout)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append",
                        help="default: the shipped fashion-mnist and twemoji bundles")
    parser.add_argument("--git-rev", help="profile the shipped bundles as committed at this revision")
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args()
    bundles = args.bundle or [MODELS / "fashion-mnist.rissole", MODELS / "twemoji.rissole"]
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.git_rev:
            bundles = [_from_git(args.git_rev, b, Path(tmp)) for b in bundles]
        results = [profile_bundle(b, args.blocks, args.rounds) for b in bundles]
    print(json.dumps(results, indent=1))
    if args.markdown:
        command = "python benchmarks/op_profile.py " + " ".join(sys.argv[1:])
        tmp = args.markdown.with_name(args.markdown.name + ".partial")
        tmp.write_text(markdown(results, command, (load_at_start, os.getloadavg()[0])))
        tmp.replace(args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the denoiser's architecture could buy: the call cost of candidate architectures (issue 16).

    python benchmarks/ablations/arch_cost.py [--blocks 256] [--rounds 21] [--variants a,b] [--json OUT]

Variants: "m1" is channel_mult [1] (no 2x2 level), "rb1" res_blocks 1, "cNN" NN channels.
Each variant is the fashion recipe (preset small + models/fashion-mnist.toml) with the
architecture it had before this study (BEFORE: 40 channels, channel_mult [1, 2], res_blocks 2)
and some of it changed, built with random weights (speed does not depend on their
values) and taken down the path `rissole-edge export` takes: ONNX export, int8 static
quantization (input and output convolutions fp32, calibrated here on random inputs of the
runtime's shapes), and the default graph rewrites kept only where bit-identical
(`graph.optimize`). Trained bundles' denoisers (--bundle, default the shipped fashion-mnist)
are timed beside them: a random-weight build costs what the trained graph of the same
architecture does, and two trained bundles compare directly. Ratios are to the "before" row.

Call times: CPU time of the calling thread (one intra-op thread, the runtime's session
options), calls of --blocks blocks, all variants interleaved round by round (medians), so
the ratios share the machine's load. MACs per block are the layers' own count
(graph.node_macs on the graph before any rewrite); the GOPS share is against the int8 peak
benchmarks/perf.py uses (a 256-channel 3x3 QDQ conv, CPU time of one thread), measured in
the same run.

"no-norm" (BEFORE without any GroupNorm: the ResBlock norms and the output norm) is not a
trainable candidate: it bounds what any cheaper normalisation could save.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

import op_profile  # noqa: E402  (benchmarks/ is not a package)
import perf  # noqa: E402
from rissole_edge.bundle import Bundle, Spec  # noqa: E402
from rissole_export import config, denoiser, graph, onnx_export, quantize  # noqa: E402
from rissole_export.layers import count_parameters  # noqa: E402

ROOT = BENCH.parent
BUNDLE = ROOT / "models" / "fashion-mnist.rissole"
RECIPE = ROOT / "models" / "fashion-mnist.toml"
CALIBRATION_BATCHES = 8

# The denoiser architecture of the fashion bundle before this study; each variant changes it.
BEFORE = {"channels": 40, "channel_mult": (1, 2), "res_blocks": 2}
# name -> denoiser overrides of BEFORE
VARIANTS: dict[str, dict] = {
    "before": {},
    "m1-c40": {"channel_mult": (1,)},
    "m1-c48": {"channel_mult": (1,), "channels": 48},
    "m1-c56": {"channel_mult": (1,), "channels": 56},
    "m1-c64": {"channel_mult": (1,), "channels": 64},
    "rb1": {"res_blocks": 1},
    "rb1-c44": {"res_blocks": 1, "channels": 44},
    "rb1-c48": {"res_blocks": 1, "channels": 48},
    "m1-rb1-c56": {"channel_mult": (1,), "res_blocks": 1, "channels": 56},
    "m1-rb1-c64": {"channel_mult": (1,), "res_blocks": 1, "channels": 64},
    "no-norm": {},
}


def _drop_norms(net: nn.Module) -> None:
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, nn.Identity())


def variant_config(name: str) -> config.RunConfig:
    """The fashion recipe with the variant's architecture (set in full, so that a row stays
    what it is whatever the recipe file says today)."""
    cfg = config.resolve("small", config.read_config_file(RECIPE))
    for key, value in {**BEFORE, **VARIANTS[name]}.items():
        setattr(cfg.denoiser, key, value)
    return cfg


def build(name: str, spec: Spec, seed: int) -> tuple[bytes, dict]:
    """The variant's int8, rewritten denoiser graph as `rissole-edge export` makes it, and its
    parameter and MAC counts."""
    cfg = variant_config(name)
    torch.manual_seed(seed)
    net = denoiser.build(cfg.denoiser, spec.latent_channels, spec.latent_side).eval()
    nn.init.normal_(net.out[-1].weight, std=0.02)       # zero at init: a trained net's is not
    if name == "no-norm":
        _drop_norms(net)
    with torch.no_grad():
        fp32 = onnx_export.denoiser(net)
    names = {"x", "t", "pos", "cond"}
    calibration = [op_profile.call_feeds(spec, 32, names, seed=i) for i in range(CALIBRATION_BATCHES)]
    int8, _ = quantize.quantize(fp32, calibration, "x86", keep_fp32=True, correct_bias=True)
    optimized, record = graph.optimize(int8)
    return optimized, {"parameters": count_parameters(net), "macs_per_block": record["denoiser_macs_per_block"],
                       "executed_macs_per_block": record["denoiser_executed_macs_per_block"],
                       "rewrites": record["denoiser_rewrites"], "overrides": VARIANTS[name]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--bundle", type=Path, action="append",
                        help="also time this bundle's denoiser (repeatable; default: the shipped fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    load_at_start = os.getloadavg()[0]
    spec = Spec.from_manifest(Bundle.open(BUNDLE).manifest)
    models, info = {}, {}
    for path in args.bundle or [BUNDLE]:
        bundle = Bundle.open(path)
        models[str(path)] = bundle.read("denoiser.onnx")
        info[str(path)] = {"macs_per_block": bundle.manifest["graph"]["denoiser_macs_per_block"],
                           "parameters": bundle.manifest["parameters"]["denoiser"]}
    for name in chosen:
        models[name], info[name] = build(name, spec, args.seed)
        print(f"built {name}: {info[name]['macs_per_block'] / 1e6:.2f} M MACs", file=sys.stderr)
    feeds = op_profile.call_feeds(spec, args.blocks, {"x", "t", "pos", "cond"}, seed=0)
    times = op_profile.call_times(models, feeds, args.rounds)
    peak = perf.spawn("ort_ceiling", threads=1).get("int8_gops_cpu")
    base = times["before"] if "before" in times else next(iter(times.values()))
    rows = {}
    for name, seconds in times.items():
        gops = 2 * info[name]["macs_per_block"] * args.blocks / seconds / 1e9
        rows[name] = {**info[name], "call_ms_cpu": seconds * 1e3, "ratio_to_before": seconds / base,
                      "gops": gops, "share_of_int8_peak": gops / peak if peak else None,
                      "op_shares": {k: round(v["share"], 3) for k, v in op_profile.op_shares(models[name], feeds)["ops"].items()}}
    result = {"blocks_per_call": args.blocks, "rounds": args.rounds, "int8_peak_gops_1_core_cpu": peak,
              "load_average": [load_at_start, os.getloadavg()[0]], "variants": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

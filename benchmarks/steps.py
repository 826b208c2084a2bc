"""The step study (issue 15): for each shipped bundle and each registered sampler, at
2..50 steps, how much quality is left, and which sampler and step count to recommend.

Per row (bundle, sampler, steps), on the same seeds:
- ms/image of the row's own generation (one run; the machine may be busy: see `timing` for
  the interleaved ratio that the speed target is judged on);
- distance to converged: pixel RMSE (0-255) of the first `--n` images against a 200-step
  dpmpp-2m run of the same seeds (the ODE every deterministic sampler approximates; ddpm is
  stochastic and lands on other images by design, so its distance measures that, not error);
- detail: mean squared Laplacian of the generated images over that of real test images
  (1.0: as much fine texture as real data; blur falls below);
- seam ratio (export/evaluate.py's), and label accuracy where the bundle has labels, judged
  by evaluate's train-split classifier on `--label-n` images per label;
- FD-EffNetLite0 and KID (evaluate's) on `--fd-n` images, for every row (`--fd all`) or, when
  features are too costly for the machine, for DDIM-50, the rows the rule needs and the step
  counts of `--fd-steps` (`--fd rule`).

The recommended default is the fewest steps whose row meets, against DDIM at 50 steps:
distance within 10%, detail within 5%, FD, seam ratio and label accuracy no worse.

    python benchmarks/steps.py                      # the full study (hours on 2 busy cores)
    python benchmarks/steps.py --n 256 --fd rule    # what fits a shared machine

Writes benchmarks/results/steps.json, steps.md, steps-<bundle>-distance.png,
steps-<bundle>-detail.png and steps-<bundle>-grid.png (image 0 of every row).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from plots import plot
from rissole_edge import images as pictures
from rissole_edge.generator import Generator, Query
from rissole_edge.sampler import SAMPLERS
from rissole_export import data as datasets
from rissole_export.config import DataConfig
from rissole_export.evaluate import cached_features, classify, features, frechet_distance, kid, seam_ratio, \
    train_classifier

RESULTS = Path(__file__).parent / "results"
STEPS = (2, 3, 4, 6, 8, 10, 15, 20, 50)
REFERENCE = ("dpmpp-2m", 200)
BASELINE = ("ddim", 50)
SEED = 0


@dataclass
class Row:
    sampler: str
    steps: int
    n: int                              # images behind ms/image, distance, detail and seams
    ms_per_image: float
    distance_to_converged: float
    detail: float
    seam_ratio: float | None
    label_n: int = 0                    # images behind label accuracy (0: not measured)
    label_accuracy: float | None = None
    fd_n: int = 0                       # images behind FD and KID (0: not measured)
    fd: float | None = None
    kid: float | None = None
    meets_rule: dict = field(default_factory=dict)      # "no worse" within 2 standard errors of the difference
    strict_rule: dict = field(default_factory=dict)     # "no worse" read literally: not one unit worse
    noise: dict = field(default_factory=dict)           # standard errors of the paired differences vs DDIM-50


def laplacian_energy(images: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian of uint8 images (N, H, W, C): fine texture and edges."""
    x = images.astype(np.float64)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.mean(lap ** 2))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


class Study:
    """One bundle's rows, sharing its data, reference images and classifier."""

    def __init__(self, name: str, args: argparse.Namespace, log=print):
        self.name, self.args, self.log = name, args, log
        self.gen = Generator.open(name)
        m = self.gen.bundle.manifest
        image = m["image"]
        self.data = datasets.load(m["dataset"]["name"], DataConfig(size=image["size"], channels=image["channels"],
                                                                   background=image.get("background", "#ffffff")))
        self.real_detail = laplacian_energy(self.data.test)
        log(f"{name}: reference run {REFERENCE[0]} x {REFERENCE[1]} steps on {args.n} images")
        self.converged = self.generate(REFERENCE[0], REFERENCE[1], args.n)
        self.labels = [x for x in self.gen.spec.labels if x in self.data.class_names] \
            if self.gen.db.labels is not None and self.data.train_labels is not None and args.label_n else []
        self.classifier = train_classifier(self.data.train, self.data.train_labels, len(self.data.class_names),
                                           SEED, log) if self.labels else None
        self.rows: dict[tuple[str, int], Row] = {}
        self.firsts: dict[tuple[str, int], np.ndarray] = {}
        self.samples: dict[tuple[str, int], dict[str, np.ndarray]] = {}   # per-image data, for paired noise
        self.f_ref: np.ndarray | None = None

    def generate(self, sampler: str, steps: int, n: int, query: Query | None = None) -> np.ndarray:
        return self.gen.generate(n, seed=SEED, steps=steps, sampler_name=sampler, query=query, as_array=True)

    def measure(self, sampler: str, steps: int) -> Row:
        n = self.args.n
        started = time.perf_counter()
        images = self.generate(sampler, steps, n)
        ms = (time.perf_counter() - started) / n * 1e3
        self.firsts[sampler, steps] = images[0]
        self.samples[sampler, steps] = {"images": images}
        row = Row(sampler, steps, n, ms, rmse(images, self.converged),
                  laplacian_energy(images) / self.real_detail, seam_ratio(images, self.gen.spec.blocks_per_side))
        if self.classifier is not None:
            correct = np.concatenate([
                classify(self.classifier, self.generate(sampler, steps, self.args.label_n, Query(label=label)))
                == self.data.class_names.index(label) for label in self.labels])
            self.samples[sampler, steps]["correct"] = correct
            row.label_n, row.label_accuracy = len(correct), float(correct.mean())
        self.rows[sampler, steps] = row
        self.log(f"{self.name} {sampler:>8} {steps:>3} steps: {ms:.1f} ms/image, distance {row.distance_to_converged:.2f}, "
                 f"detail {row.detail:.3f}, seams {row.seam_ratio}, labels {row.label_accuracy}")
        return row

    def add_fd(self, row: Row) -> None:
        if row.fd_n:
            return
        n = min(self.args.fd_n, len(self.data.test))
        refs = self.data.test[np.sort(np.random.default_rng(SEED).permutation(len(self.data.test))[:n])]
        generated = self.generate(row.sampler, row.steps, n)
        f_gen, self.f_ref = features(generated), cached_features(refs)
        self.samples[row.sampler, row.steps]["features"] = f_gen
        row.fd_n, row.fd, row.kid = n, frechet_distance(f_gen, self.f_ref), kid(f_gen, self.f_ref, seed=SEED)
        self.log(f"{self.name} {row.sampler} {row.steps}: FD {row.fd:.2f}, KID {row.kid:.4f} (N={n})")


def paired_se(stat, a: np.ndarray, b: np.ndarray, rounds: int = 200) -> float:
    """Bootstrap standard error of stat(a) - stat(b) where a[i] and b[i] come from the same seed
    and query (resampled together): how far apart two rows can be by chance alone."""
    rng = np.random.default_rng(SEED)
    diffs = []
    for _ in range(rounds):
        idx = rng.integers(0, len(a), len(a))
        diffs.append(stat(a[idx]) - stat(b[idx]))
    return float(np.std(diffs, ddof=1))


def noise(s: "Study", row: Row, base: Row) -> dict:
    """Standard errors of the row-minus-baseline differences that "no worse" is judged on
    (kept per row: FD's is recomputed only once the row has features)."""
    a, b = s.samples[row.sampler, row.steps], s.samples[base.sampler, base.steps]
    known = a.get("noise")
    if known is not None and (known["fd"] is not None or "features" not in a):
        return known
    bps = s.gen.spec.blocks_per_side
    out = {"seam": (known or {}).get("seam") if known else
           (paired_se(lambda x: seam_ratio(x, bps), a["images"], b["images"]) if bps > 1 else None),
           "label": paired_se(np.mean, a["correct"], b["correct"], 1000) if "correct" in a else None,
           "fd": paired_se(lambda f: frechet_distance(f, s.f_ref), a["features"], b["features"], 30)
           if "features" in a and "features" in b and a is not b else None}
    a["noise"] = out
    return out


def rule(row: Row, base: Row, se: dict | None = None) -> dict:
    """Which of the issue's conditions the row meets against DDIM-50 (None: not measured).
    With `se`, "no worse" allows a difference within 2 standard errors (not measurably worse);
    without, it is read literally."""
    se = se or {}

    def no_worse(a, b, error, higher_is_better=False):
        if a is None or b is None:
            return None
        worse_by = (b - a) if higher_is_better else (a - b)
        return worse_by <= 2 * (error or 0.0)
    return {
        "distance_within_10pct": row.distance_to_converged <= 1.10 * base.distance_to_converged,
        "detail_within_5pct": abs(row.detail - base.detail) <= 0.05 * base.detail,
        "fd_no_worse": no_worse(row.fd, base.fd, se.get("fd")),
        "seam_no_worse": no_worse(row.seam_ratio, base.seam_ratio, se.get("seam")),
        "label_accuracy_no_worse": no_worse(row.label_accuracy, base.label_accuracy, se.get("label"),
                                            higher_is_better=True),
    }


def passes(checks: dict, labelled: bool) -> bool | None:
    """True/False once every condition is known; None while FD is missing."""
    needed = {k: v for k, v in checks.items() if labelled or k != "label_accuracy_no_worse"}
    if any(v is False for k, v in needed.items() if k != "fd_no_worse" or v is not None):
        return False
    return None if needed["fd_no_worse"] is None else all(needed.values())


def study(name: str, args: argparse.Namespace) -> dict:
    s = Study(name, args)
    for sampler in args.samplers:
        for steps in args.steps:
            s.measure(sampler, steps)
    base = s.rows.get(BASELINE) or s.measure(*BASELINE)
    s.add_fd(base)
    labelled = bool(s.labels)
    chosen = None
    for row in sorted(s.rows.values(), key=lambda r: (r.steps, r.distance_to_converged)):
        if args.fd == "all" or row.steps in args.fd_steps:
            s.add_fd(row)
        verdict = passes(rule(row, base, noise(s, row, base)), labelled)
        if verdict is None and chosen is None and (row.sampler, row.steps) != BASELINE:
            s.add_fd(row)                     # the rule needs FD here: measure it
            verdict = passes(rule(row, base, noise(s, row, base)), labelled)
        if verdict and chosen is None and row.steps < BASELINE[1]:
            chosen = row
    for row in s.rows.values():
        row.noise = noise(s, row, base)
        row.meets_rule, row.strict_rule = rule(row, base, row.noise), rule(row, base)
    folder = args.out.parent
    grid_path = folder / f"steps-{name}-grid.png"
    cells = [pictures.to_pil(s.firsts[sampler, steps]) for sampler in args.samplers for steps in args.steps]
    pictures.save_png(pictures.grid(cells, columns=len(args.steps)), grid_path)
    for measure, label in (("distance_to_converged", "pixel RMSE to the 200-step reference"),
                           ("detail", "Laplacian energy / real test images")):
        plot(folder / f"steps-{name}-{measure.split('_')[0]}.png", f"{name}: {measure.replace('_', ' ')}",
             list(args.steps), {sampler: [getattr(s.rows[sampler, k], measure) for k in args.steps]
                                for sampler in args.samplers}, "steps (denoiser calls per block)", label)
    result = {"bundle": name, "argv": args.argv, "samplers": args.samplers, "steps": args.steps, "seed": SEED,
              "reference": list(REFERENCE), "real_detail": s.real_detail,
              "guidance": s.gen.spec.guidance, "labels": s.labels, "label_per_class": args.label_n,
              "rows": [asdict(r) for r in s.rows.values()],
              "recommended": None if chosen is None else {"sampler": chosen.sampler, "steps": chosen.steps}}
    if chosen is not None:
        result["timing"] = time_ratio(s.gen, BASELINE, (chosen.sampler, chosen.steps), args.timing_n, args.rounds)
    s.gen.close()
    return result


def time_ratio(gen: Generator, slow: tuple[str, int], fast: tuple[str, int], n: int, rounds: int) -> dict:
    """Seconds per image of two settings, interleaved in one run (a busy machine slows both
    alike), and their ratio of medians; denoiser calls per block are the step counts."""
    times: dict[tuple, list[float]] = {slow: [], fast: []}
    gen.generate(n, seed=SEED + 1, steps=2, as_array=True)          # warm-up
    for _ in range(rounds):
        for setting in (slow, fast):
            started = time.perf_counter()
            gen.generate(n, seed=SEED + 1, steps=setting[1], sampler_name=setting[0], as_array=True)
            times[setting].append((time.perf_counter() - started) / n)
    a, b = float(np.median(times[slow])), float(np.median(times[fast]))
    return {"images": n, "rounds": rounds, "baseline_s_per_image": a, "default_s_per_image": b,
            "time_ratio": a / b, "call_ratio": slow[1] / fast[1]}


def _verdict(checks: dict, labelled: bool) -> str:
    needed = {k: v for k, v in checks.items() if labelled or not k.startswith("label")}
    failed = [k.split("_")[0] for k, v in needed.items() if v is False]
    return "no: " + ", ".join(failed) if failed else ("yes" if None not in needed.values() else "FD not measured")


def _disagreements(r: dict) -> list[str]:
    """Where FD/KID rank a row at least as good as DDIM-50 although the other measures say it
    is further from the converged images or has less detail: said plainly, row by row."""
    base = next(x for x in r["rows"] if (x["sampler"], x["steps"]) == BASELINE)
    lines = []
    for x in r["rows"]:
        if x is base or x["fd"] is None or x["fd"] > base["fd"]:
            continue
        if not (x["meets_rule"]["distance_within_10pct"] and x["meets_rule"]["detail_within_5pct"]):
            lines.append(f"- FD disagrees: {x['sampler']} at {x['steps']} steps has FD {x['fd']:.2f} (KID "
                         f"{x['kid']:.4f}), no worse than DDIM-50's {base['fd']:.2f} ({base['kid']:.4f}), yet its "
                         f"distance to converged is {x['distance_to_converged']:.1f} against {base['distance_to_converged']:.1f} "
                         f"and its detail {x['detail']:.3f} against {base['detail']:.3f}.")
    if lines:
        lines = ["", "Where FD and the other measures disagree (FD alone would pick fewer steps):", ""] + lines
    return lines


def markdown(results: list[dict]) -> str:
    commands = "; ".join(f"`python benchmarks/steps.py {' '.join(r['argv'])}`" for r in results) \
        + (" (one run per bundle, joined by `--render`)" if len(results) > 1 else "")
    out = ["# Step study (issue 15)", "",
           f"Generated by {commands}; seed {SEED}. Distance: pixel RMSE "
           f"(0-255) to a {REFERENCE[1]}-step {REFERENCE[0]} run of the same seeds. Detail: mean squared "
           "Laplacian over that of the real test images. N columns say how many images each measure used. "
           "ms/image comes from each row's own run on a shared, busy machine: compare the interleaved "
           "timing below, not these.", "",
           "The rule's \"no worse\" for FD, seam ratio and label accuracy is judged two ways. *Read literally*: "
           "not worse by any amount. *Within noise* (the recommendation): not worse by more than 2 bootstrap "
           "standard errors of the paired difference against DDIM-50 (same seeds and queries, resampled "
           "together; `noise` in the JSON). Read literally, a row whose images are nearly the same as DDIM-50's "
           "fails on one image of 300 or a seam-ratio difference in the fourth decimal.", ""]
    for r in results:
        out += [f"## {r['bundle']} (guidance {r['guidance']:g})", "",
                "| sampler | steps | ms/image | distance to converged (N) | detail | seam ratio | label acc (N) "
                "| FD (N) | KID | meets rule (within noise) | read literally |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in sorted(r["rows"], key=lambda x: (list(SAMPLERS).index(x["sampler"]), x["steps"])):
            is_base = (row["sampler"], row["steps"]) == BASELINE
            verdict = "baseline" if is_base else _verdict(row["meets_rule"], bool(r["labels"]))
            literal = "baseline" if is_base else _verdict(row["strict_rule"], bool(r["labels"]))
            label = f"{row['label_accuracy']:.3f} ({row['label_n']})" if row["label_accuracy"] is not None else "-"
            fd = f"{row['fd']:.2f} ({row['fd_n']})" if row["fd"] is not None else "-"
            kid_text = f"{row['kid']:.4f}" if row["kid"] is not None else "-"
            seams = f"{row['seam_ratio']:.3f}" if row["seam_ratio"] is not None else "-"
            out.append(f"| {row['sampler']} | {row['steps']} | {row['ms_per_image']:.1f} | "
                       f"{row['distance_to_converged']:.2f} ({row['n']}) | {row['detail']:.3f} | {seams} | {label} | "
                       f"{fd} | {kid_text} | {verdict} | {literal} |")
        if not r["labels"]:
            out += ["", "Label accuracy was not measured for this bundle (`--label-n 0` or no labels), so the "
                    "rule's label condition is unchecked here."]
        out += _disagreements(r)
        rec = r["recommended"]
        out += ["", f"Recommended: **{rec['sampler']} at {rec['steps']} steps**." if rec else
                "Recommended: none of the rows meets the rule; the bundle keeps DDIM-50."]
        if "timing" in r:
            t = r["timing"]
            out.append(f"Interleaved timing ({t['rounds']} rounds of {t['images']} images): DDIM-50 "
                       f"{t['baseline_s_per_image'] * 1e3:.1f} ms/image, default {t['default_s_per_image'] * 1e3:.1f} "
                       f"ms/image: {t['time_ratio']:.2f}x less time, {t['call_ratio']:.2f}x fewer denoiser calls.")
        out += ["", f"![distance](steps-{r['bundle']}-distance.png) ![detail](steps-{r['bundle']}-detail.png)", "",
                f"Image 0 of every row (rows: {', '.join(r['samplers'])}; columns: {', '.join(map(str, r['steps']))} "
                f"steps): ![grid](steps-{r['bundle']}-grid.png)", ""]
    return "\n".join(out)


def _load(path: Path) -> list[dict]:
    """A results file's bundles, each with the command line and grid it was measured with."""
    saved = json.loads(path.read_text())
    for r in saved["results"]:
        r.setdefault("argv", saved.get("argv", []))
        r.setdefault("samplers", list(dict.fromkeys(row["sampler"] for row in r["rows"])))
        r.setdefault("steps", sorted({row["steps"] for row in r["rows"]}))
    return saved["results"]


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", nargs="+", default=["fashion-mnist", "twemoji"])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    p.add_argument("--n", type=int, default=1000, help="images per row for ms/image, distance, detail, seams")
    p.add_argument("--fd-n", type=int, default=5000, help="images per FD/KID row")
    p.add_argument("--fd", choices=("all", "rule"), default="all")
    p.add_argument("--fd-steps", nargs="*", type=int, default=[], help="with --fd rule: also these step counts")
    p.add_argument("--label-n", type=int, default=100, help="images per label (0: no label accuracy)")
    p.add_argument("--timing-n", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "steps.json")
    p.add_argument("--render", nargs="+", type=Path, help="only write OUT and its .md from these result JSONs")
    args = p.parse_args()
    args.argv = sys.argv[1:]
    torch.set_num_threads(1)     # EfficientNet features: more threads only thrash a shared machine
    if BASELINE[1] not in args.steps:
        args.steps.append(BASELINE[1])
    results = [r for f in args.render for r in _load(f)] if args.render else [study(name, args) for name in args.bundles]
    payload = json.dumps({"results": results}, indent=2)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(payload)
    tmp.replace(args.out)
    md = args.out.with_suffix(".md")
    md.with_suffix(".tmp").write_text(markdown(results))
    md.with_suffix(".tmp").replace(md)
    print(payload)


if __name__ == "__main__":
    main()

"""The step study (issue 15): for each shipped bundle and each registered sampler, at
2..50 steps, how much quality is left, and which sampler and step count to recommend.

Per row (bundle, sampler, steps), on the same seeds:
- ms/image of the row's own generation (one run; the machine may be busy: see `timing` for
  the interleaved ratio that the speed target is judged on);
- distance to converged: pixel RMSE (0-255) of the first `--n` images against a 200-step
  dpmpp-2m run of the same seeds (the ODE every deterministic sampler approximates; ddpm is
  stochastic and lands on other images by design, so its distance measures that, not error);
- detail: mean squared Laplacian of those images over that of real test images (1.0: as much
  fine texture as real data; blur falls below); seam ratio (export/evaluate.py's) of them;
- label accuracy where the bundle has labels, judged by evaluate's train-split classifier on
  `--label-n` images per label;
- FD-EffNetLite0 and KID (evaluate's) on the first `--fd-n` images against as many real test
  images (fewer where the test split is smaller), for DDIM-50, then the rows of `--fd-rows`
  in their order (distilled students too: `--fd-rows fashion-mnist-4step`), then any row the
  rule needs, then with `--fd all` every other row. Features cost ~32 ms per image on one
  core, so at N=5,000 FD is the study's cost: the rows that matter go first.

Every measurement is cached per bundle file (under the feature cache, keyed by the bundle's
hash and the row), and the results file is rewritten after every FD row: a study cut short
keeps what it measured, the same command resumes it, and `--cached-only` writes the results
of what is cached without measuring more. The table says which N each row's FD has.

The recommended default is the fewest steps whose row meets, against DDIM at 50 steps:
distance within 10%, detail within 5%, FD, seam ratio and label accuracy no worse.

    python benchmarks/steps.py --bundles fashion-mnist --fd rule --fd-rows dpmpp-3m:20 ...
    python benchmarks/steps.py --render results/steps-fashion-mnist.json results/steps-twemoji-teacher.json \\
        --out results/steps.json

Writes OUT (JSON) and its .md, steps-<bundle>-distance.png, steps-<bundle>-detail.png and
steps-<bundle>-grid.png (image 0 of every row).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from plots import plot
from rissole_edge import images as pictures
from rissole_edge import shipped
from rissole_edge.bundle import Bundle
from rissole_edge.generator import Generator, Query
from rissole_edge.sampler import SAMPLERS
from rissole_export import data as datasets
from rissole_export.config import DataConfig
from rissole_export.evaluate import classify, feature_cache_dir, features, frechet_distance, kid, seam_ratio, \
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
    bundle: str | None = None           # a distilled student measured beside its teacher (None: the teacher)


def laplacian_energy(images: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian of uint8 images (N, H, W, C): fine texture and edges."""
    x = images.astype(np.float64)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.mean(lap ** 2))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def _digest(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()).hexdigest()[:16]


def fingerprint(gen: Generator) -> str:
    """What the bundle generates (two images at 2 ddim steps): the cache key. Not the file's
    hash: the shipped bundles are rewritten (graph rewrites, re-packs) with the same images,
    and every cached measure depends on the images only."""
    return _digest(gen.generate(2, seed=SEED, steps=2, sampler_name="ddim", as_array=True, force_steps=True))


class Cache:
    """Measurements kept on disk per bundle (keyed by its `fingerprint`), so that a study cut
    short resumes where it stopped and rows are never measured twice: plain .npy arrays,
    written atomically, never unpickled."""

    def __init__(self, gen: Generator):
        self.folder = feature_cache_dir().parent / "steps" / fingerprint(gen)
        self.folder.mkdir(parents=True, exist_ok=True)

    def array(self, key: str, make) -> np.ndarray:
        path = self.folder / f"{key}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
        value = make()
        if value is not None:
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, value, allow_pickle=False)
            tmp.replace(path)
        return value

    def has(self, key: str) -> bool:
        return (self.folder / f"{key}.npy").exists()

    def features(self, images: np.ndarray) -> np.ndarray:
        """EfficientNet-Lite0 features, keyed by the pixels (rows with equal images share them).
        Batches of 16: twice as fast on one core as evaluate's 64 (measured 32 vs 65 ms/image),
        and the same features."""
        return self.array(f"features-{_digest(images)}", lambda: features(images, batch=16))


class Study:
    """One bundle's rows, sharing its data, reference images and classifier."""

    def __init__(self, name: str, args: argparse.Namespace, log=print):
        # A bundle given as a path is named by its file, so that the plots' and grid's file names hold no folder.
        self.name, self.args, self.log = Path(name).name.removesuffix(".rissole"), args, log
        self.gen = Generator.open(name, threads=args.threads)
        self.cache = Cache(self.gen)
        m = self.gen.bundle.manifest
        image = m["image"]
        self.data = datasets.load(m["dataset"]["name"], DataConfig(size=image["size"], channels=image["channels"],
                                                                   background=image.get("background", "#ffffff")))
        self.real_detail = laplacian_energy(self.data.test)
        log(f"{name}: reference run {REFERENCE[0]} x {REFERENCE[1]} steps on {args.n} images")
        self.converged = self.cache.array(f"converged-{REFERENCE[0]}-{REFERENCE[1]}-n{args.n}",
                                          lambda: self.generate(self.gen, REFERENCE[0], REFERENCE[1], args.n))
        self.labels = [x for x in self.gen.spec.labels if x in self.data.class_names] \
            if self.gen.db.labels is not None and self.data.train_labels is not None and args.label_n else []
        self._classifier = None
        self.rows: dict[tuple[str, int], Row] = {}
        self.students: dict[str, Row] = {}
        self.firsts: dict[tuple[str, int], np.ndarray] = {}
        self.samples: dict[tuple, dict[str, np.ndarray]] = {}   # per-image data, for paired noise
        self.fd_n = min(args.fd_n, len(self.data.test))
        refs = self.data.test[np.sort(np.random.default_rng(SEED).permutation(len(self.data.test))[:self.fd_n])]
        self.f_ref = self.cache.features(refs) if not args.cached_only or self.cache.has(
            f"features-{_digest(refs)}") else None

    @staticmethod
    def generate(gen: Generator, sampler: str, steps: int, n: int, query: Query | None = None,
                 first_index: int = 0) -> np.ndarray:
        return gen.generate(n, seed=SEED, steps=steps, sampler_name=sampler, query=query, as_array=True,
                            first_index=first_index)

    def classifier(self):
        """The label judge, trained on first use (minutes on a busy core; a resumed study whose
        label rows are all cached never needs it)."""
        if self._classifier is None:
            self._classifier = train_classifier(self.data.train, self.data.train_labels, len(self.data.class_names),
                                                SEED, self.log)
        return self._classifier

    def _key(self, row: Row) -> str:
        return f"{row.bundle or 'teacher'}-{row.sampler}-{row.steps}"

    def measure(self, sampler: str, steps: int, student: str | None = None) -> Row | None:
        """A row's cheap measures on the first `--n` images (from the cache when measured before;
        None in --cached-only mode when it never was)."""
        gen = Generator.open(student, threads=self.args.threads) if student else self.gen
        if student:             # its rows live in the teacher's folder: refuse them if it changed
            known = self.cache.array(f"{student}-fingerprint", lambda: np.array(fingerprint(gen)))
            if str(known) != fingerprint(gen):
                raise SystemExit(f"{student} generates other images than when its rows were cached in "
                                 f"{self.cache.folder}: remove its files there")
        key, n = f"{student or 'teacher'}-{sampler}-{steps}", self.args.n
        timing = self.cache.array(f"{key}-ms-n{n}", lambda: None)
        if timing is None and self.args.cached_only:
            return None
        started = time.perf_counter()
        images = self.cache.array(f"{key}-images-n{n}", lambda: self.generate(gen, sampler, steps, n))
        if timing is None:
            timing = self.cache.array(f"{key}-ms-n{n}",
                                      lambda: np.array((time.perf_counter() - started) / n * 1e3))
        row = Row(sampler, steps, n, float(timing), rmse(images, self.converged),
                  laplacian_energy(images) / self.real_detail, seam_ratio(images, self.gen.spec.blocks_per_side),
                  bundle=student)
        sample = {"images": images}
        if self.labels:
            correct = self.cache.array(f"{key}-correct-l{self.args.label_n}", lambda: np.concatenate([
                classify(self.classifier(), self.generate(gen, sampler, steps, self.args.label_n, Query(label=label)))
                == self.data.class_names.index(label) for label in self.labels]))
            sample["correct"] = correct
            row.label_n, row.label_accuracy = len(correct), float(correct.mean())
        if student:
            self.students[student] = row
            self.samples[student] = sample
        else:
            self.firsts[sampler, steps] = images[0]
            self.rows[sampler, steps] = row
            self.samples[sampler, steps] = sample
        self.log(f"{self.name} {key}: {row.ms_per_image:.1f} ms/image, distance {row.distance_to_converged:.2f}, "
                 f"detail {row.detail:.3f}, seams {row.seam_ratio}, labels {row.label_accuracy}")
        self.add_fd(row, only_cached=True)
        return row

    def add_fd(self, row: Row, only_cached: bool = False) -> None:
        """FD and KID of the row's first `fd_n` images against `fd_n` real test images; its first
        `--n` images are the ones measured already (image i depends only on seed and i)."""
        key, n = self._key(row), row.n
        if row.fd_n or self.f_ref is None:
            return
        if (only_cached or self.args.cached_only) and not self.cache.has(f"{key}-features-n{self.fd_n}"):
            return
        gen = Generator.open(row.bundle, threads=self.args.threads) if row.bundle else self.gen

        def more() -> np.ndarray:
            first = self.samples[row.bundle or (row.sampler, row.steps)]["images"]
            rest = self.generate(gen, row.sampler, row.steps, self.fd_n - n, first_index=n)
            return self.cache.features(np.concatenate([first, rest])[:self.fd_n])
        f_gen = self.cache.array(f"{key}-features-n{self.fd_n}", more)
        self.samples[row.bundle or (row.sampler, row.steps)]["features"] = f_gen
        row.fd_n, row.fd, row.kid = self.fd_n, frechet_distance(f_gen, self.f_ref), kid(f_gen, self.f_ref, seed=SEED)
        self.log(f"{self.name} {key}: FD {row.fd:.2f}, KID {row.kid:.4f} (N={self.fd_n})")


def paired_se(stat, a: np.ndarray, b: np.ndarray, rounds: int = 200) -> float:
    """Bootstrap standard error of stat(a) - stat(b) where a[i] and b[i] come from the same seed
    and query (resampled together): how far apart two rows can be by chance alone."""
    rng = np.random.default_rng(SEED)
    diffs = []
    for _ in range(rounds):
        idx = rng.integers(0, len(a), len(a))
        diffs.append(stat(a[idx]) - stat(b[idx]))
    return float(np.std(diffs, ddof=1))


FD_ROUNDS = 16     # FD costs ~4 s at N=5,000 and 1280 features on one busy core


def noise(s: Study, row: Row, base: Row) -> dict:
    """Standard errors of the row-minus-baseline differences that "no worse" is judged on.
    FD's (the costly one) only where it matters: when the row's FD is worse than DDIM-50's;
    no worse read literally is no worse within noise too."""
    a = s.samples[row.bundle or (row.sampler, row.steps)]
    b = s.samples[base.sampler, base.steps]
    if a is b:
        return {"seam": None, "label": None, "fd": None}
    bps = s.gen.spec.blocks_per_side
    fd_se = None
    if row.fd is not None and base.fd is not None and row.fd > base.fd:
        fd_se = float(s.cache.array(f"{s._key(row)}-fdse-n{row.fd_n}-r{FD_ROUNDS}", lambda: np.array(
            paired_se(lambda f: frechet_distance(f, s.f_ref), a["features"], b["features"], FD_ROUNDS))))
    if "se" not in a:
        a["se"] = {"seam": paired_se(lambda x: seam_ratio(x, bps), a["images"], b["images"]) if bps > 1 else None,
                   "label": paired_se(np.mean, a["correct"], b["correct"], 1000) if "correct" in a else None}
    return {**a["se"], "fd": fd_se}


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


def _planned(token: str) -> tuple[str, int] | str:
    """An --fd-rows entry: SAMPLER:STEPS of the study's bundle, or a distilled student's name."""
    sampler, _, steps = token.partition(":")
    return (sampler, int(steps)) if steps else token


def study(name: str, args: argparse.Namespace) -> dict:
    """Every row's cheap measures first (minutes), then FD at `--fd-n` for DDIM-50, the rows of
    `--fd-rows` in their order, and whatever the rule needs; with `--fd all`, then every other
    row. The results file is rewritten after each FD row, so a study cut short keeps its work
    (and a rerun resumes from the cache)."""
    s = Study(name, args)
    for sampler in args.samplers:
        for steps in args.steps:
            s.measure(sampler, steps)
    base = s.rows.get(BASELINE) or s.measure(*BASELINE)
    if base is None:
        raise SystemExit(f"{name}: nothing cached yet; run without --cached-only first")
    write_grid(s)
    s.add_fd(base)
    save = args.save or (lambda result: None)
    for token in args.fd_rows:
        planned = _planned(token)
        row = s.measure("ddim", Bundle.open(shipped.resolve(planned)).manifest["sampling"]["distilled_steps"],
                        planned) if isinstance(planned, str) else s.rows.get(planned) or s.measure(*planned)
        if row is not None:
            s.add_fd(row)
            save(summarise(s, base))
    labelled = bool(s.labels)
    for row in sorted(s.rows.values(), key=lambda r: (r.steps, r.distance_to_converged)):
        if passes(rule(row, base, noise(s, row, base)), labelled) is None and row.steps < BASELINE[1]:
            s.add_fd(row)                     # the rule needs FD here: measure it
            save(summarise(s, base))
            if passes(rule(row, base, noise(s, row, base)), labelled):
                break
    if args.fd == "all":
        for row in sorted(s.rows.values(), key=lambda r: (-r.steps, r.sampler)):
            if not row.fd_n and not args.cached_only:
                s.add_fd(row)
                save(summarise(s, base))
    result = summarise(s, base)
    if result["recommended"] is not None:             # seconds, so --cached-only times too
        rec = result["recommended"]
        result["timing"] = time_ratio(s.gen, BASELINE, (rec["sampler"], rec["steps"]), args.timing_n, args.rounds)
    s.gen.close()
    return result


def summarise(s: Study, base: Row) -> dict:
    """The bundle's result so far: every row with its verdicts, and the recommendation (the
    fewest steps that meet the rule within noise; students are reported, not recommended)."""
    labelled = bool(s.labels)
    for row in [*s.rows.values(), *s.students.values()]:
        row.noise = noise(s, row, base)
        row.meets_rule, row.strict_rule = rule(row, base, row.noise), rule(row, base)
    chosen = None
    for row in sorted(s.rows.values(), key=lambda r: (r.steps, r.distance_to_converged)):
        verdict = passes(row.meets_rule, labelled)
        if verdict is None:
            break                             # an unmeasured FD here could still make it the answer
        if verdict and row.steps < BASELINE[1]:
            chosen = row
            break
    return {"bundle": s.name, "argv": s.args.argv, "samplers": s.args.samplers, "steps": s.args.steps, "seed": SEED,
            "reference": list(REFERENCE), "real_detail": s.real_detail, "guidance": s.gen.spec.guidance,
            "labels": s.labels, "label_per_class": s.args.label_n,
            "rows": [asdict(r) for r in [*s.rows.values(), *s.students.values()]],
            "recommended": None if chosen is None else {"sampler": chosen.sampler, "steps": chosen.steps}}


def write_grid(s: Study) -> None:
    """Image 0 of every row in one picture, and the distance and detail plots."""
    args = s.args
    folder = args.out.parent
    cells = [pictures.to_pil(s.firsts[sampler, steps]) for sampler in args.samplers for steps in args.steps]
    pictures.save_png(pictures.grid(cells, columns=len(args.steps)), folder / f"steps-{s.name}-grid.png")
    for measure, label in (("distance_to_converged", "pixel RMSE to the 200-step reference"),
                           ("detail", "Laplacian energy / real test images")):
        plot(folder / f"steps-{s.name}-{measure.split('_')[0]}.png", f"{s.name}: {measure.replace('_', ' ')}",
             list(args.steps), {sampler: [getattr(s.rows[sampler, k], measure) for k in args.steps]
                                for sampler in args.samplers}, "steps (denoiser calls per block)", label)


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
    """Where FD (or KID) and the other measures disagree about a row against DDIM-50: FD no
    worse although the row is further from the converged images or has less detail, FD worse
    although distance and detail meet the rule, and KID and FD on opposite sides of DDIM-50.
    Said plainly, row by row."""
    base = next(x for x in r["rows"] if (x["sampler"], x["steps"]) == BASELINE and x.get("bundle") is None)
    lines = []
    for x in r["rows"]:
        if x is base or x["fd"] is None:
            continue
        other_pass = x["meets_rule"]["distance_within_10pct"] and x["meets_rule"]["detail_within_5pct"]
        where = (f"{_name(x)} at {x['steps']} steps has FD {x['fd']:.2f} (KID {x['kid']:.4f}; N={x['fd_n']}) against "
                 f"DDIM-50's {base['fd']:.2f} ({base['kid']:.4f})")
        measures = (f"its distance to converged is {x['distance_to_converged']:.2f} against "
                    f"{base['distance_to_converged']:.2f} and its detail {x['detail']:.3f} against {base['detail']:.3f}")
        if x["fd"] <= base["fd"] and not other_pass:
            lines.append(f"- FD says no worse, the others say worse: {where}, yet {measures}.")
        elif x["meets_rule"]["fd_no_worse"] is False and other_pass:
            lines.append(f"- FD says worse (beyond noise), distance and detail say as good: {where}; {measures}.")
        if (x["fd"] <= base["fd"]) != (x["kid"] <= base["kid"]):
            lines.append(f"- FD and KID disagree: {where}.")
    if lines:
        lines = ["", "Where FD and the other measures disagree:", ""] + lines
    return lines


def _students(r: dict) -> list[str]:
    """Each distilled student against its teacher's DDIM-50 row of this table (same seeds, same
    real images), in the terms of the issue's distillation targets: FD and detail within 10%,
    label accuracy within 2 points (speed is judged in benchmarks/distilled.py)."""
    base = next(x for x in r["rows"] if (x["sampler"], x["steps"]) == BASELINE and x.get("bundle") is None)
    lines = []
    for x in r["rows"]:
        if not x.get("bundle"):
            continue
        fd = f"FD {100 * (x['fd'] / base['fd'] - 1):+.1f}% (N={x['fd_n']})" if x["fd"] is not None else "FD not measured"
        label = f", label accuracy {100 * (x['label_accuracy'] - base['label_accuracy']):+.1f} points" \
            if x["label_accuracy"] is not None and base["label_accuracy"] is not None else ""
        lines.append(f"- `{x['bundle']}` ({x['steps']} steps) against DDIM-50: {fd}, detail "
                     f"{100 * (x['detail'] / base['detail'] - 1):+.1f}%{label} (targets: FD and detail within 10%, "
                     "label accuracy within 2 points).")
    return ["", "Distilled students (the Laplacian detail measure of this table):", ""] + lines if lines else []


def _name(row: dict) -> str:
    """The sampler column: the sampler, or the distilled student's bundle (it samples with ddim)."""
    return f"`{row['bundle']}` (distilled, ddim)" if row.get("bundle") else row["sampler"]


def markdown(results: list[dict]) -> str:
    commands = "; ".join(f"`python benchmarks/steps.py {' '.join(r['argv'])}`" for r in results) \
        + (" (one run per bundle, joined by `--render`)" if len(results) > 1 else "")
    out = ["# Step study (issue 15)", "",
           f"Generated by {commands}; seed {SEED}. Distance: pixel RMSE "
           f"(0-255) to a {REFERENCE[1]}-step {REFERENCE[0]} run of the same seeds. Detail: mean squared "
           "Laplacian over that of the real test images. N columns say how many images each measure used: "
           "distance, detail and seam ratio use the same first N images of every row (the distance column's N); "
           "label accuracy uses its own N; FD and KID the FD column's N, against as many real test images "
           "(all of them where the test split is smaller); `-` is not measured. "
           "ms/image comes from each row's own run on a shared, busy machine: compare the interleaved "
           "timing below, not these.", "",
           "The rule's \"no worse\" for FD, seam ratio and label accuracy is judged two ways. *Read literally*: "
           "not worse by any amount. *Within noise* (the recommendation): not worse by more than 2 bootstrap "
           "standard errors of the paired difference against DDIM-50 (same seeds and queries, resampled "
           "together; `noise` in the JSON). Read literally, a row whose images are nearly the same as DDIM-50's "
           "fails on one image of 300 or a seam-ratio difference in the fourth decimal. FD's standard error is a "
           f"{FD_ROUNDS}-round bootstrap, computed only where a row's FD is above DDIM-50's.", ""]
    for r in results:
        with_fd = [f"{_name(x)} {x['steps']}" for x in r["rows"] if x["fd"] is not None]
        fd_ns = sorted({x["fd_n"] for x in r["rows"] if x["fd"] is not None})
        out += [f"## {r['bundle']} (guidance {r['guidance']:g})", "",
                f"FD and KID at N = {' / '.join(f'{n:,}' for n in fd_ns) or '-'} for {len(with_fd)} of "
                f"{len(r['rows'])} rows ({', '.join(with_fd)}); the other rows have none.", "",
                "| sampler | steps | ms/image | distance to converged (N) | detail | seam ratio | label acc (N) "
                "| FD (N) | KID | meets rule (within noise) | read literally |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in sorted(r["rows"], key=lambda x: (x.get("bundle") is not None, list(SAMPLERS).index(x["sampler"]),
                                                    x["steps"])):
            is_base = (row["sampler"], row["steps"]) == BASELINE and row.get("bundle") is None
            verdict = "baseline" if is_base else _verdict(row["meets_rule"], bool(r["labels"]))
            literal = "baseline" if is_base else _verdict(row["strict_rule"], bool(r["labels"]))
            label = f"{row['label_accuracy']:.3f} ({row['label_n']})" if row["label_accuracy"] is not None else "-"
            fd = f"{row['fd']:.2f} ({row['fd_n']})" if row["fd"] is not None else "-"
            kid_text = f"{row['kid']:.4f}" if row["kid"] is not None else "-"
            seams = f"{row['seam_ratio']:.3f}" if row["seam_ratio"] is not None else "-"
            out.append(f"| {_name(row)} | {row['steps']} | {row['ms_per_image']:.1f} | "
                       f"{row['distance_to_converged']:.2f} ({row['n']}) | {row['detail']:.3f} | {seams} | {label} | "
                       f"{fd} | {kid_text} | {verdict} | {literal} |")
        if not r["labels"]:
            out += ["", "Label accuracy was not measured for this bundle (`--label-n 0` or no labels), so the "
                    "rule's label condition is unchecked here."]
        out += _students(r)
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
        for row in r["rows"]:
            row.setdefault("bundle", None)
        r.setdefault("samplers", list(dict.fromkeys(row["sampler"] for row in r["rows"])))
        r.setdefault("steps", sorted({row["steps"] for row in r["rows"]}))
    return saved["results"]


def _write(results: list[dict], out: Path) -> None:
    """OUT (JSON) and its .md, each replaced atomically."""
    for path, text in ((out, json.dumps({"results": results}, indent=2)), (out.with_suffix(".md"), markdown(results))):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", nargs="+", default=["fashion-mnist", "twemoji-teacher"])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    p.add_argument("--n", type=int, default=1000, help="images per row for ms/image, distance, detail, seams")
    p.add_argument("--fd-n", type=int, default=5000, help="images per FD/KID row (at most the test split)")
    p.add_argument("--fd", choices=("all", "rule"), default="all",
                   help="FD for every row, or only for DDIM-50, --fd-rows and the rows the rule needs")
    p.add_argument("--fd-rows", nargs="*", default=[],
                   help="SAMPLER:STEPS rows, or distilled students' bundle names, to give FD first, in this order")
    p.add_argument("--label-n", type=int, default=100, help="images per label (0: no label accuracy)")
    p.add_argument("--timing-n", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="generation threads (the study is sized for one core)")
    p.add_argument("--cached-only", action="store_true",
                   help="measure no new rows: write OUT from what earlier (perhaps cut-short) runs cached, "
                        "with a new interleaved timing")
    p.add_argument("--out", type=Path, default=RESULTS / "steps.json")
    p.add_argument("--render", nargs="+", type=Path, help="only write OUT and its .md from these result JSONs")
    args = p.parse_args()
    args.argv = [a for a in sys.argv[1:] if a != "--cached-only"]
    torch.set_num_threads(1)     # EfficientNet features: more threads only thrash a shared machine
    if BASELINE[1] not in args.steps:
        args.steps.append(BASELINE[1])
    if args.render:
        _write([r for f in args.render for r in _load(f)], args.out)
        return
    done: list[dict] = []
    args.save = lambda partial: _write(done + [partial], args.out)
    for name in args.bundles:
        done.append(study(name, args))
        _write(done, args.out)
    print(json.dumps({"results": done}, indent=2))


if __name__ == "__main__":
    main()

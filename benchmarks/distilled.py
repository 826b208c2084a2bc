"""A distilled few-step bundle against its teacher: the targets of issue 15, in one run.

    python benchmarks/distilled.py --student models/fashion-mnist-4step.rissole \
        --teacher models/fashion-mnist.rissole [-n 1000] [--rounds 3] [-o results.json]

For the teacher at `--teacher-steps` (50) DDIM steps and the student at its own step count, and
for the teacher at the student's step count as the baseline that distillation must beat:
- FD-EffNetLite0, KID, seam ratio and label accuracy (`rissole_export.evaluate`, N images);
- detail: high-frequency energy of the generated images relative to real test images (blur
  lowers it; FD can reward blur, this cannot);
- distance to the teacher's many-step images of the same seeds (pixel RMSE, 256 images);
- ms per image, measured in fresh processes (bench's child: batches of 8 on 2 threads, DDIM),
  rounds interleaved, so that a shared machine slows both alike; the speed-up is the median of
  the rounds' ratios (the ratio of the medians is kept too), and the JSON keeps the load
  average before and after. `--rows ''` times
  the rows an existing --out holds without measuring their quality again.
Images are DDIM throughout (evaluate pins it), seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from compare_speed import TIMED_IMAGES, ms_per_image
from rissole_edge.bundle import Bundle
from rissole_edge.generator import Generator
from rissole_export import data, evaluate
from rissole_export.config import DataConfig

DISTANCE_IMAGES = 256
HIGH_FREQUENCY = 0.25      # cycles per pixel: the outer band of the spectrum (Nyquist is 0.5)


def high_frequency_energy(images: np.ndarray) -> float:
    """Mean spectral energy above HIGH_FREQUENCY cycles/pixel of uint8 images (N, H, W, C)."""
    x = images.astype(np.float64) / 255
    x = x - x.mean(axis=(1, 2), keepdims=True)
    spectrum = np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2
    fy = np.fft.fftfreq(x.shape[1])[:, None]
    fx = np.fft.fftfreq(x.shape[2])[None, :]
    band = np.sqrt(fy ** 2 + fx ** 2) > HIGH_FREQUENCY
    return float(spectrum[:, band].sum(axis=1).mean() / (x.shape[1] * x.shape[2]))


def _generate(bundle: Path, n: int, steps: int) -> np.ndarray:
    with Generator.open(bundle, threads=2) as gen:
        return gen.generate(n, seed=0, steps=steps, sampler_name="ddim", as_array=True, force_steps=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("-n", type=int, default=1000, help="images for FD/KID/seams/labels and detail")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (0: no timing)")
    parser.add_argument("--rows", default="teacher,student,teacher_at_student_steps",
                        help="rows to measure now; the others are kept from --out (so rows can be run apart; "
                             "'' times the rows the file holds)")
    parser.add_argument("-o", "--out", type=Path)
    args = parser.parse_args()
    steps = Bundle.open(args.student).manifest["sampling"]["distilled_steps"]
    rows = {"teacher": (args.teacher, args.teacher_steps), "student": (args.student, steps),
            "teacher_at_student_steps": (args.teacher, steps)}
    result: dict = {"n": args.n, "student_steps": steps, "teacher_steps": args.teacher_steps, "rows": {}}
    wanted = [row for row in args.rows.split(",") if row]
    if args.out and args.out.exists():
        kept = json.loads(args.out.read_text())
        # Kept from the file: the rows not measured now and its notes (timing only: its N too).
        result = {**kept, **({} if not wanted else {"n": args.n}), "student_steps": steps,
                  "teacher_steps": args.teacher_steps}
    if wanted:
        _measure_quality(args, {row: rows[row] for row in wanted}, result)
    if args.rounds == 0 or not {"teacher", "student"} <= set(result["rows"]):
        return
    _measure_time(args.rounds, rows, result)
    print(json.dumps(result, indent=2))
    _save(result, args.out)


def _measure_quality(args: argparse.Namespace, rows: dict[str, tuple[Path, int]], result: dict) -> None:
    """FD, KID, seams, labels, detail and distance to the teacher of each row, saved as each ends."""
    manifest = Bundle.open(args.teacher).manifest
    image = manifest["image"]
    name = manifest["dataset"]["name"]
    real = data.load(name, DataConfig(source=name, size=image["size"], channels=image["channels"],
                                      background=image.get("background", "#ffffff"))).test[:args.n]
    real_hf = high_frequency_energy(real)
    reference = _generate(args.teacher, DISTANCE_IMAGES, args.teacher_steps).astype(np.float64)
    result["reference_images"] = len(real)
    for row, (path, s) in rows.items():
        images = _generate(path, args.n, s)
        metrics = evaluate.evaluate(path, args.n, steps=s, log=lambda msg: None)
        result["rows"][row] = {
            "bundle": str(path), "steps": s, "fd": metrics["fd_effnetlite0"], "kid": metrics["kid_effnetlite0"],
            "seam_ratio": metrics["seam_ratio_generated"], "label_accuracy": metrics["label_accuracy"],
            "copying_score": metrics["copying_score"],
            "detail": high_frequency_energy(images) / real_hf,
            "distance_to_teacher": float(np.sqrt(((images[:DISTANCE_IMAGES] - reference) ** 2).mean())),
        }
        _save(result, args.out)


def _measure_time(rounds: int, rows: dict[str, tuple[Path, int]], result: dict) -> None:
    """ms per image of the teacher and the student, interleaved rounds; the targets."""
    times: dict[str, list[float]] = {"teacher": [], "student": []}
    load = [os.getloadavg()[0]]
    for _ in range(rounds):
        for row in times:
            times[row].append(ms_per_image(*rows[row]))
    load.append(os.getloadavg()[0])
    for row, values in times.items():
        result["rows"][row]["ms_per_image"] = statistics.median(values)
        result["rows"][row]["ms_per_image_rounds"] = values
    result["timing"] = {"bundles": {row: str(rows[row][0]) for row in times},
                        "rounds": rounds, "images_per_batch": TIMED_IMAGES, "threads": 2, "sampler": "ddim",
                        "speedup_per_round": [a / b for a, b in zip(times["teacher"], times["student"])],
                        "load_average_1min_before_after": load,
                        "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    t, s = result["rows"]["teacher"], result["rows"]["student"]
    result["targets"] = {
        "fd_within_10pct": s["fd"] <= 1.10 * t["fd"],
        "detail_within_10pct": abs(s["detail"] - t["detail"]) <= 0.10 * t["detail"],
        "label_accuracy_within_2_points": None if t["label_accuracy"] is None
        else abs(s["label_accuracy"] - t["label_accuracy"]) <= 0.02,
        # Rounds are pairs run a few seconds apart: on a machine whose load drifts, the median
        # of their ratios is steadier than the ratio of the two medians (both kept).
        "speedup": statistics.median(result["timing"]["speedup_per_round"]),
        "speedup_of_medians": t["ms_per_image"] / s["ms_per_image"],
    }


def _save(result: dict, out: Path | None) -> None:
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)


if __name__ == "__main__":
    main()

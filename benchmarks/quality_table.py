"""Print the quality ablation table (markdown) from `rissole-edge evaluate --json` results.

    python benchmarks/quality_table.py benchmarks/results/quality-*-n5000.json

Each file is one row; the row's name is the file name between "quality-" and "-n<N>.json".
Rows are compared only when they share N, seed and steps (FD and KID are biased by N), so the
script refuses a mix. The ratio column is each row's FD over the first row's.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _row_name(path: Path) -> str:
    match = re.fullmatch(r"quality-(.+)-n\d+\.json", path.name)
    return match.group(1) if match else path.stem


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _seams(r: dict) -> str:
    """Generated / the references through the target's autoencoder (the control; results from
    before evaluate measured it have none) / the references themselves."""
    return " / ".join(_ratio(r.get(key)) for key in
                      ("seam_ratio_generated", "seam_ratio_reconstructed", "seam_ratio_reference"))


def _agreement(r: dict) -> str:
    return " / ".join(_percent(r.get(key)) for key in
                      ("block_agreement_generated", "block_agreement_reconstructed", "block_agreement_test"))


def _copying(r: dict) -> str:
    """Generated / unseen test images within their autoencoder round trip of a training image;
    results from before that measure show their old score, marked as such."""
    if "copying_method" not in r:
        return f"{_percent(r['copying_score'])} (old method)"
    return f"{_percent(r['copying_score'])} / {_percent(r['copying_score_test'])}"


def table(paths: list[Path]) -> str:
    results = [(path, json.loads(path.read_text())) for path in paths]
    settings = {(r["n"], r["seed"], r["steps"], r["reference"]) for _, r in results}
    if len(settings) != 1:
        raise SystemExit(f"error: rows differ in (n, seed, steps, reference): {sorted(settings)}")
    base_fd = results[0][1]["fd_effnetlite0"]
    lines = ["| row | target | FD-EffNetLite0 | FD / first row | KID | seam ratio (generated / autoencoder / real) "
             "| copying (generated / unseen test) | blocks agree (generated / autoencoder / test) | label accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path, r in results:
        lines.append(
            f"| {_row_name(path)} | `{r['target']}` ({r['kind']}) | {r['fd_effnetlite0']:.2f} "
            f"| {r['fd_effnetlite0'] / base_fd:.3f} | {r['kid_effnetlite0']:.4f} "
            f"| {_seams(r)} "
            f"| {_copying(r)} | {_agreement(r)} | {_percent(r['label_accuracy'])} |")
    n, seed, steps, reference = settings.pop()
    lines.append("")
    lines.append(f"N = {n} generated images per row against {results[0][1]['reference_images']} "
                 f"{reference} images, {steps} DDIM steps, seed {seed}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="evaluate --json files, first row = reference")
    args = parser.parse_args()
    missing = [p for p in args.results if not p.is_file()]
    if missing:
        raise SystemExit(f"error: {missing[0]} not found")
    print(table(args.results))


if __name__ == "__main__":
    main()

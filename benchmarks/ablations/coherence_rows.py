"""Block coherence of several rows, with intervals (issue 17, item 2; export/coherence.py).

One judge, trained on the twemoji training split through the autoencoder of --autoencoder
(default the shipped teacher's; the seams ablation rows and the table in quality.md were
decoded and judged with the previous teacher's, `git show 4c93857:models/twemoji-teacher.rissole`,
so pass that one to re-run them), measures each row:
a bundle (N images generated exactly as `rissole-edge evaluate` makes them: DDIM, the
bundle's default guidance and steps, seed 0) or a .npy of uint8 images (N, 64, 64, 3), such as
the seams ablation's kept images. Rows of one kind (the .npy files of one ablation; bundles,
which `evaluate` gives the same queries and noise at one seed) are paired: their differences
are bootstrapped over images, the same images from both; every row is also compared with
the control, the held-out test emoji through the autoencoder (unpaired bootstrap).

    python benchmarks/ablations/coherence_rows.py ROW... [-n 1000] [--autoencoder BUNDLE] [--json OUT]

A ROW is NAME=PATH (a .rissole bundle or a .npy file). Generated images of bundles are kept
in the evaluation cache's folder, keyed by the bundle's bytes, n and the seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rissole_edge.generator import Generator
from rissole_export import coherence, data, evaluate, train
from rissole_export.config import DataConfig

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = 1000


def bundle_images(path: Path, n: int, seed: int) -> np.ndarray:
    """`evaluate`'s generated images of a bundle (its _open_bundle generate, default steps)."""
    key = hashlib.sha256(path.read_bytes() + f"{n}/{seed}".encode()).hexdigest()[:24]
    kept = evaluate.feature_cache_dir().parent / "coherence" / f"generated-{key}.npy"
    if kept.exists():
        return np.load(kept, allow_pickle=False)
    source = evaluate._open_bundle(path, lambda msg: print(msg, file=sys.stderr))
    try:
        images = source.generate(n, seed, source.default_steps)
    finally:
        source.close()
    kept.parent.mkdir(parents=True, exist_ok=True)
    np.save(kept, images)
    return images


def interval(flags: list[np.ndarray], paired: bool, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the share (one set) or of the difference second - first."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP):
        picks = [rng.integers(0, len(f), len(f)) for f in flags]
        if paired:
            picks = [picks[0]] * len(flags)
        shares = [f[p].mean() for f, p in zip(flags, picks)]
        values.append(shares[-1] - shares[0] if len(shares) == 2 else shares[0])
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", help="NAME=PATH, a .rissole bundle or a .npy of uint8 images")
    parser.add_argument("-n", type=int, default=1000, help="images per bundle row (a .npy row: its first n)")
    parser.add_argument("--autoencoder", type=Path, default=ROOT / "models" / "twemoji-teacher.rissole")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-seed", type=int, default=coherence.JUDGE_SEED,
                        help="another judge (evaluate's is JUDGE_SEED): how much the verdicts depend on it")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grids", type=Path, help="folder for coherence-NAME.png per row: the 32 images the "
                        "judge finds most incoherent (upper half), then the 32 it finds least")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [tuple(r.split("=", 1)) for r in args.rows]
    if any(len(r) != 2 or not Path(r[1]).exists() for r in rows):
        parser.error("each row is NAME=PATH of an existing .rissole or .npy file")

    images = data.load("twemoji", DataConfig(size=64, channels=3))
    log = lambda msg: print(msg, file=sys.stderr)   # noqa: E731
    with Generator.open(args.autoencoder, threads=1) as gen:
        round_trip = evaluate._onnx_round_trip(gen)
        net = coherence.cached_judge(images.train, round_trip, 2, args.judge_seed, log)
        accuracy, caught, control = coherence.ceiling(net, images.test, round_trip, 2)
        unseen_ids, _ = evaluate._unseen_test(images, evaluate._unit(images.train), args.seed)
        unseen = coherence.judged_incoherent(net, round_trip(images.test[unseen_ids]))
    out = {"autoencoder": str(args.autoencoder), "judge_seed": args.judge_seed,
           "judge_accuracy": accuracy, "judge_caught": caught,
           "control": {"n": len(control), "incoherent": float(control.mean()), "95": interval([control], False)},
           "unseen_control": {"n": len(unseen), "incoherent": float(unseen.mean()), "95": interval([unseen], False)},
           "rows": []}
    earlier: list[tuple[str, str, np.ndarray]] = []
    for name, path in rows:
        path = Path(path)
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)[:args.n]
        else:
            x = bundle_images(path, args.n, args.seed)
        scores = coherence.incoherence(net, x)
        flags = scores > coherence.THRESHOLD
        if args.grids:
            order = np.argsort(-scores, kind="stable")
            train.save_grid(np.concatenate([x[order[:32]], x[order[-32:]]]), args.grids / f"coherence-{name}.png")
        row = {"row": name, "path": str(path), "n": len(x), "incoherent": float(flags.mean()),
               "95": interval([flags], False), "minus_control_95": interval([control, flags], False)}
        for other, suffix, other_flags in earlier:      # same kind, same n: same queries and noise
            if suffix == path.suffix and len(other_flags) == len(flags):
                row[f"minus_{other}_paired_95"] = interval([other_flags, flags], True)
        earlier.append((name, path.suffix, flags))
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

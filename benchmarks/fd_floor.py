"""The FD a perfect generator would read: real training images in place of generated ones.

`evaluate` compares N generated images with the test split (403 emoji for Twemoji), and FD
from so few images is biased upwards: two sets of real images from one distribution do not
read 0. This measures that floor the way `evaluate` measures a target, with N training
images drawn without replacement (several draws) against the same reference images, so an
FD target can be read against what real data gets at the same N.

    python benchmarks/fd_floor.py twemoji -n 403 1000 2000 --draws 3

Prints JSON. Needs the toolchain (the data and EfficientNet-Lite0 features, cached).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from rissole_edge.errors import RissoleError
from rissole_export import data
from rissole_export.config import DataConfig
from rissole_export.evaluate import cached_features, frechet_distance


def floor(source: str, sizes: list[int], draws: int, seed: int) -> dict:
    """FD of `draws` draws of each size of training images against the whole test split."""
    images = data.load(source, DataConfig(source=source))      # the source's default size, as train uses
    train, test = cached_features(images.train), cached_features(images.test)
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        if not 2 <= n <= len(train):
            raise RissoleError(f"-n {n}: the train split has {len(train)} images (give 2 to {len(train)})")
        fds = [frechet_distance(train[rng.choice(len(train), n, replace=False)], test) for _ in range(draws)]
        rows.append({"n": n, "fd": [round(x, 2) for x in fds], "fd_mean": round(float(np.mean(fds)), 2)})
    return {"data": source, "reference": "test", "reference_images": len(test), "train_images": len(train),
            "seed": seed, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="fashion-mnist, twemoji or an image folder")
    p.add_argument("-n", type=int, nargs="+", default=[2000], help="training images per draw (evaluate's -n)")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        result = floor(args.data, args.n, args.draws, args.seed)
    except RissoleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

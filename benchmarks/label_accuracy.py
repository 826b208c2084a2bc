"""`--label` accuracy alone, for one or more bundles of the same data, judged by one classifier.

    python benchmarks/label_accuracy.py models/twemoji.rissole models/twemoji-teacher.rissole \
        --per-label 100 -o benchmarks/results/labels-twemoji.json

For each bundle: the share of images generated for each label that evaluate's classifier (a
small CNN trained on the train split with class-balanced draws) assigns to that label, and the
classifier's own accuracy on real test images and on the unseen ones among them (no skin-tone
variants or pixel duplicates of training images), plain, balanced and per label: as high as
the measure can read. The same figures as `rissole-edge evaluate` at the same seed, without
FD, copying or seams, so a re-measure costs minutes. Prints JSON; -o also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rissole_export import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--per-label", type=int, default=evaluate.LABEL_IMAGES, help="images generated per label (at most 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, help="guidance scale (default: each bundle's recommended scale)")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)       # noqa: E731
    rows, net = [], None
    for bundle in args.bundles:
        row, net = evaluate.label_accuracy(bundle, per_label=args.per_label, seed=args.seed, net=net,
                                            guidance=args.guidance, log=log)
        rows.append(row)
        log(f"{bundle}: label accuracy {row['label_accuracy']}, classifier balanced on unseen test "
            f"{row['classifier_unseen_test_balanced_accuracy']}")
    text = json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()

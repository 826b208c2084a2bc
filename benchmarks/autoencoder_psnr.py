"""Test PSNR of a bundle's own autoencoder round trip: the held-out test images through its fp32
ONNX encoder and its (int8) ONNX decoder, the sessions the runtime and `evaluate` run
(`evaluate._onnx_round_trip`). PSNR of the MSE pooled over all test images and pixels, the
measure `train` writes to autoencoder.json for the torch autoencoder, so the two compare: what
quantizing the decoder costs. Needs the toolchain (for the data).

    python benchmarks/autoencoder_psnr.py models/twemoji-teacher.rissole models/twemoji-teacher.toml
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from rissole_edge.generator import Generator
from rissole_export import config, data
from rissole_export.evaluate import _onnx_round_trip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("recipe", type=Path, help="the config the bundle was trained with (its data section)")
    args = p.parse_args()
    cfg = config.resolve("small", config.read_config_file(args.recipe))
    with Generator.open(args.bundle, threads=1) as gen:
        test = data.load(gen.bundle.manifest["dataset"]["name"], cfg.data).test
        reconstructed = _onnx_round_trip(gen)(test)
    mse = float(np.mean((reconstructed.astype(np.float64) - test.astype(np.float64)) ** 2))
    print(json.dumps({"bundle": str(args.bundle), "test_images": len(test),
                      "psnr": round(10 * math.log10(255 ** 2 / max(mse, 1e-10)), 3)}))


if __name__ == "__main__":
    main()

"""Crash-safe export, tested by killing it: `python benchmarks/kill_export.py RUN_DIR [--trials 20]`.

Each trial starts `rissole-edge export RUN_DIR -o TARGET` over an existing bundle and SIGKILLs
it at a random moment of a full export's duration. After every kill: TARGET is either the old
bundle byte for byte or a complete new bundle that verifies, and no other file in the folder
opens as a bundle. Prints JSON and writes benchmarks/results/kill_export.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rissole_edge.bundle import Bundle
from rissole_edge.errors import RissoleError


def _export(run: Path, target: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rissole_edge", "export", str(run), "-o", str(target),
                             "--calibration-samples", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="kill-export-"))
    target = folder / "model.rissole"
    t0 = time.perf_counter()
    if _export(args.run, target).wait() != 0:
        raise SystemExit("the reference export failed")
    full = time.perf_counter() - t0
    outcomes = []
    for trial in range(args.trials):
        before = target.read_bytes()
        delay = rng.uniform(0, full)
        proc = _export(args.run, target)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        after = target.read_bytes()
        state = "old bundle intact" if after == before else "new bundle complete"
        try:
            Bundle.open(target).verify_all()
        except RissoleError as e:
            state = f"BROKEN: {e}"
        strays = []
        for path in folder.iterdir():
            if path == target:
                continue
            try:
                Bundle.open(path)
                strays.append(f"{path.name} looks like a bundle")
            except RissoleError:
                path.unlink()        # a hidden .partial from the kill: not a bundle; tidy up
        outcomes.append({"trial": trial, "kill_after_s": round(delay, 3), "exit": code, "target": state,
                         "stray_bundles": strays})
    shutil.rmtree(folder)
    failures = [o for o in outcomes if o["target"].startswith("BROKEN") or o["stray_bundles"]]
    result = {"trials": args.trials, "full_export_s": round(full, 2), "failures": len(failures),
              "old_intact": sum(o["target"] == "old bundle intact" for o in outcomes),
              "new_complete": sum(o["target"] == "new bundle complete" for o in outcomes), "outcomes": outcomes}
    out = Path(__file__).parent / "results" / "kill_export.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "outcomes"}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

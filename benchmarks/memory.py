"""Where the memory of a default `generate` goes, as the OS counts it (issue 16, item 3).

    python benchmarks/memory.py [--python /tmp/plainvenv/bin/python] [--write]

The target (80 MB peak RSS for a default `rissole-edge generate`, -n 4 and -n 1000) is about
a plain `pip install .`, so run it with that install's interpreter (`--python`); the runtime
measured is the one that interpreter imports. Two kinds of figures:

- peaks: `rissole-edge generate -n N` (CLI) and the same work through the API, each in its
  own process; the peak is ru_maxrss from wait4(), the figure `/usr/bin/time -v` prints as
  "Maximum resident set size";
- stages: a fresh interpreter imports the runtime's dependencies one at a time, then opens the
  default bundle's parts one at a time, and VmRSS / RssAnon / VmHWM are read after each step (a
  second one opens a whole Generator and generates). RssAnon is the anonymous part (heap,
  arenas, Python objects); the rest of RSS is file pages, mostly libraries' code.

Prints JSON; `--write` also writes benchmarks/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20

_RSS = """
def rss():
    v = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:")):
            v[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return v["VmRSS"], v["VmHWM"], v["RssAnon"]
stages = []
def stage(name):
    now, peak, anon = rss()
    stages.append({"stage": name, "rss_mb": now, "anon_mb": anon, "peak_mb": peak})
"""

# The runtime's dependencies one at a time, then the bundle's parts one at a time; last, what
# only some queries load (the HNSW index for --like; Pillow for --like, --grid and --preview).
PARTS = _RSS + """
import json, sys
stage("python")
import numpy; stage("+ numpy")
import onnxruntime; stage("+ onnxruntime")
import rissole_edge.rng; stage("+ numpy.random (rissole_edge.rng, without OpenSSL)")
from rissole_edge import generator, retrieval, workers; stage("+ rissole_edge.generator")
import rissole_edge.cli; stage("+ rissole_edge.cli (typer)")
from rissole_edge.bundle import Bundle, Spec
from rissole_edge.shipped import resolve
bundle = Bundle.open(resolve(None)); spec = Spec.from_manifest(bundle.manifest); stage("Bundle.open")
denoiser = workers.session(bundle, "denoiser.onnx"); stage("+ denoiser session")
decoder = workers.session(bundle, "decoder.onnx"); stage("+ decoder session")
db = retrieval.Database(bundle, spec); stage("+ database (codes, labels, entry neighbour lists)")
from rissole_edge import budget
budget.release_code_pages(); stage("+ release_code_pages() (Generator.open calls it before its sessions and once open)")
db.load_index(); stage("+ HNSW index (only a --like query loads it)")
import PIL.Image, PIL.PngImagePlugin; stage("+ Pillow (only --like, --grid, --preview load it)")
print(json.dumps(stages))
"""

# A whole Generator, then generation; last, the CLI module (typer) on top.
API = _RSS + """
import json, sys
from rissole_edge.generator import Generator
stage("import rissole_edge.generator")
gen = Generator.open(); stage("Generator.open")
for n in (4, 64, 1000):
    gen.generate(n, as_array=True); stage(f"generate({n})")
gen.close()
import rissole_edge.cli; stage("+ import rissole_edge.cli")
print(json.dumps(stages))
"""

# What `generate -n N` does, through the API: open, generate, write PNGs.
API_GENERATE = """
import sys
from pathlib import Path
from rissole_edge import images
from rissole_edge.generator import Generator
n, out = int(sys.argv[1]), Path(sys.argv[2])
with Generator.open() as gen:
    for i, pixels in enumerate(gen.generate(n, as_array=True)):
        images.save_png(pixels, out / f"{i:04d}.png")
"""


def peak_of(cmd: list[str]) -> float:
    """Peak RSS (MB) of a child process as the OS counts it: ru_maxrss from wait4."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-1:]}")
    return round(usage.ru_maxrss / 1024, 1)


def stages(python: str, code: str) -> list[dict]:
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())    # not the checkout: its rissole_edge/ would shadow the install
    if proc.returncode != 0:
        raise RuntimeError(f"stage probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli_peaks(python: str, sizes: list[int], threads: int | None = None) -> dict:
    """Peaks of `generate -n N`; with `threads`, `--threads` too (the default plan takes a second
    worker only when a core is idle, so a busy machine measures the one-worker plan)."""
    cli = str(Path(python).parent / "rissole-edge")
    extra = ["--threads", str(threads)] if threads else []
    with tempfile.TemporaryDirectory() as tmp:
        return {f"cli generate -n {n}{' ' + ' '.join(extra) if extra else ''}":
                peak_of([cli, "generate", "-n", str(n), *extra, "-o", f"{tmp}/c{n}"]) for n in sizes}


def measure(python: str, sizes: list[int]) -> dict:
    out: dict = {"python": python, "load_average_1min": {"start": round(os.getloadavg()[0], 1)}, "peaks_mb": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            out["peaks_mb"].update(cli_peaks(python, [n]))
            os.makedirs(f"{tmp}/a{n}")
            out["peaks_mb"][f"api generate({n}) + PNGs"] = peak_of([python, "-c", API_GENERATE, str(n), f"{tmp}/a{n}"])
        for threads in (1, 2):
            out["peaks_mb"].update(cli_peaks(python, sizes, threads))
    out["stages_parts"] = stages(python, PARTS)
    out["stages_api"] = stages(python, API)
    out["load_average_1min"]["end"] = round(os.getloadavg()[0], 1)
    return out


NOTES = """
## Where the bytes go, and what is left to take

Read with the stage tables above (each row is measured in the same run).

- The interpreter and the imports are most of it: numpy, onnxruntime (its library's pages),
  numpy.random (loaded with rissole_edge.rng), typer for the CLI.
- onnxruntime's first session pages in about 9 MB more of its library's code (kernel
  registration, graph optimisers) and adds about 10 MB of anonymous memory (its environment,
  the graph, weights and prepacked weights of a 2.6 MB model): the denoiser session row. The
  decoder's session is small.
- The database row is the parsed arrays: codes, labels and each entry's neighbour lists
  (`entry_neighbours.npy`). hnswlib and its index (about 9 MB) load only for a query by image
  (`--like`) and `verify`; Pillow (3 MB) only to read a query image or write a grid or preview.
- Library pages run once are dropped (`budget.release_code_pages`, the release_code_pages row):
  `Generator.open` drops this process's resident pages of shared libraries' clean, read-only
  mappings (code and read-only data: mappings with no written or anonymous page, never a
  writable one) before its first session and once it is open, and only the pages used again
  come back, as minor faults from the page cache. These are pages the kernel would also reclaim
  under memory pressure: the saving is real resident memory, but cheap memory, and the
  anonymous column does not move. At the peak of `generate(1000)` about two thirds of RSS is
  anonymous (heap, onnxruntime's arena, Python objects) and a third library pages in use.
  CPU time (plain install, busy machine, load 5.5-6.5, interleaved pairs against the install
  without it, two runs): `generate -n 4` 1.07x as the median of 16 paired ratios in both (about
  +25 ms: two reads of /proc/self/smaps and about 800 more minor faults), `-n 1000` 0.98x and
  1.02x (4 pairs each; 0.99x with --threads 1, 3 pairs): within the noise, as 25 ms at open
  are 0.5% of it.
- Generation adds the activations of the rows in flight (128 by default; onnxruntime holds
  about 30-45 KB per row), the decoder's (2 fashion images per call) and first-use costs. Two
  worker threads (an idle machine's default plan once its groups' forgone savings have paid
  for the second session: the first group of 64 images of a default -n 1000; or `--threads 2`) add
  about 6-7 MB at -n 1000: the second worker's own denoiser session (about 6 MB, with the
  library pages its build pages in dropped before and after), two calls and two decoder calls
  at once, a second thread's heap. A default `-n 4` stays on one worker and never makes it.

Removed in issue 16, item 3: typer 0.29's pydantic (typer < 0.29), OpenSSL (sha256 from
CPython's own module; sha512 only for signed bundles; `secrets` no longer imported for temp
names, and numpy.random imported with a stand-in for `secrets`: 3.8 MB), the second copy of
the index while it is checked and loaded, onnxruntime's intra-op thread pools, 16-image
decoder calls (58 MB on twemoji) and 256-row denoiser calls; then, each measured on its own
with this script on a plain install (busy 2-core machine, one worker), in MB of the CLI's
peak at -n 4 / -n 1000:

| change | -n 4 | -n 1000 |
|---|---|---|
| no HNSW index for a query from an entry (`entry_neighbours.npy`) | -9.1 | -10.1 |
| PNGs without Pillow, Pillow and hnswlib imported lazily, numpy.random without OpenSSL | -6.0 | -5.9 |
| onnxruntime without memory patterns; decoder calls of 2 images, not 4-5 | -1.1 | -1.7 |
| the C heap's free pages returned after each session and the database (malloc_trim) | -2.0 | -0.3 |
| the CLI does not keep every image's pixels (`generate(collect=False)`) | 0 | -0.6 |
| 96 rows in flight instead of 128 (3.3% more CPU time) | 0 | -2.8 |
| clean library pages dropped before the sessions and once open (`release_code_pages`) | -13.0 to -13.5 | -15.5 to -17.3 |
| back to 128 rows in flight (the 3.3% of CPU time back: the peak had room) | see the tables above | |

The last row: four runs (load 5-6), each the install just before the change against the one
with it in the same run (the "before" rows above are the last; the three before it also
dropped other read-only file mappings, about 0.2 MB more).

Tried and not kept: onnxruntime's `session.disable_prepacking` (1 MB less, 1.9x slower),
no CPU arena (4-7 MB more at -n 1000), `use_device_allocator_for_initializers` and an
environment arena that extends by the size asked (no gain), graph optimisation level
"extended" (1 MB less activation, 6% slower), `MALLOC_MMAP_THRESHOLD_` at 64 KB (1.3 MB less
at -n 1000, 2.8% more CPU), a per-group heap trim (the peak is inside a group). Variants of
the page drop (the CLI with the drops patched in, busy machine), peaks at -n 4 / -n 1000
against 78.1 / 81.6-82.4 MB without and 65.8-66.0 / 66.0-67.9 MB with the two kept: only
onnxruntime's library 70.2 / 70.2 MB; only executable mappings 68.9 / 69.6-71.8 MB; every
clean read-only file mapping, not only shared libraries' 65.5-65.6 / 66.0-68.2 MB (against
65.7-65.9 / 65.8-68.4 MB for libraries only, the same run: no gain); a third
drop right after the denoiser session 63.8-63.9 / 63.9-66.3 MB (about 2 MB below two drops,
for 1.10-1.12x CPU time at -n 4 against 1.07-1.08x); once the Generator is open only 77.3 MB at
-n 4 (the peak is inside the open).

Both targets are met (80 MB at -n 4 and -n 1000). What is left, should less be wanted: the
activations of 128 rows in flight (96 rows: 2.8 MB less, for 3.3% more CPU time; 64: 3.8 MB
less, 6.5% more), onnxruntime's arena and sessions, typer (about 2.5 MB for the CLI; rich is not imported
by `generate`, shellingham is). The memory planner (budget.py) still counts onnxruntime's
library pages as resident, so planned budgets stay on the safe side.
"""


def markdown(r: dict) -> str:
    lines = ["# Memory of a default `generate`", "",
             "Produced by `python benchmarks/memory.py --python PY --write` with PY the interpreter of a plain",
             "`pip install .` (a separate venv, non-editable). Peaks are ru_maxrss from wait4(), the figure",
             "`/usr/bin/time -v` prints as \"Maximum resident set size\". 1 MB = 2^20 bytes. Load average (1 min,",
             f"2 cores) {r['load_average_1min']['start']} at the start, {r['load_average_1min']['end']} at the end.", "",
             "| run | peak RSS (MB) |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in r["peaks_mb"].items()]
    if "before" in r:
        lines += [f"| `{k}`, before: {r['before']['label']} | {v} |"
                  for k, v in r["before"]["peaks_mb"].items()]
    for key, title in (("stages_parts", "Dependencies, then the default bundle's parts, one at a time"),
                       ("stages_api", "A whole Generator, then generation, then the CLI module on top")):
        lines += ["", f"## {title}", "", "| stage | RSS (MB) | of which anonymous (MB) | peak so far (MB) |",
                  "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['rss_mb']} | {s.get('anon_mb', '')} | {s['peak_mb']} |" for s in r[key]]
    return "\n".join(lines) + "\n" + NOTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the install to measure")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 1000])
    parser.add_argument("--before", help="interpreter of an older install: its CLI peaks too, for comparison")
    parser.add_argument("--before-label", default="", help="what the older install is, for the table")
    parser.add_argument("--write", action="store_true", help="write results/memory.json and memory.md")
    args = parser.parse_args()
    result = measure(args.python, args.sizes)
    if args.before:
        result["before"] = {"python": args.before, "label": args.before_label or args.before,
                            "peaks_mb": cli_peaks(args.before, args.sizes)}
    print(json.dumps(result, indent=2))
    if args.write:
        (RESULTS / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "memory.md").write_text(markdown(result))


if __name__ == "__main__":
    main()

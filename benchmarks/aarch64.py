"""Prove the runtime on aarch64 (Raspberry Pi class boards) under qemu-user emulation.

    sudo .venv/bin/python benchmarks/aarch64.py [--root DIR] [--bundle B ...] [--export] \
        --out benchmarks/results/aarch64.json

What it does (every step is skipped when its result is already there, so a rerun is cheap):

1. builds an arm64 Debian bookworm root with debootstrap (needs debootstrap, qemu-user-static and
   binfmt-support from apt on the host; the root lives outside the repository);
2. installs the runtime there the way a Pi user would: a venv, `pip install` of this source tree,
   PyPI wheels for onnxruntime/numpy/pillow/typer, and hnswlib compiled from its sdist
   (HNSWLIB_NO_NATIVE=1; it has no aarch64 wheel). `--hnswlib chroma` uses the chroma-hnswlib
   wheels instead (they provide the same `import hnswlib`); `auto` falls back to them if the
   compile fails;
3. runs `rissole-edge generate` with every bundle on aarch64 (one run per emulated CPU model,
   QEMU_CPU=cortex-a72 is a Pi 4, cortex-a76 a Pi 5) and on x86 with the host venv, same seed;
4. compares the PNGs (exact equality, max |diff|, PSNR over uint8 pixels) and records the peak
   RSS of the emulated process, versions and commands in --out (JSON) and a .md table beside it.

The host side runs in the project's venv (it compares PNGs with numpy and Pillow). Timings under emulation are recorded but are not representative of a board.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

REPO = Path(__file__).resolve().parent.parent
HOST_CLI = REPO / ".venv" / "bin" / "rissole-edge"
VENV = "/opt/rissole-venv"          # inside the root
SRC = "/opt/rissole-src"
BUNDLES = "/opt/rissole-bundles"
HOST_CA = "/etc/ssl/certs/host-ca-bundle.crt"
OUTS = "/opt/rissole-out"
PACKAGES = "python3,python3-venv,python3-pip,python3-dev,g++,ca-certificates"
DEFAULT_BUNDLES = ["models/fashion-mnist.rissole", "/tmp/fm-arm64.rissole", "/tmp/fm-fp32.rissole"]
EXPORTS = {"/tmp/fm-arm64.rissole": ["--target", "arm64"], "/tmp/fm-fp32.rissole": ["--quantize", "fp32"]}
RUN = "runs/fashion-small"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"   # absolute: the chroot's PATH is not the host's


class Fail(Exception):
    """A one-line reason to stop."""


def log(msg: str) -> None:
    print(f"[aarch64 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short(cmd: list[str]) -> str:
    return " ".join(a if "\n" not in a and len(a) < 80 else "..." for a in cmd)


def sh(cmd: list[str], *, env: dict | None = None, timeout: float | None = None, check: bool = True,
       logfile: Path | None = None) -> subprocess.CompletedProcess:
    out = open(logfile, "a") if logfile else subprocess.PIPE
    try:
        p = subprocess.run(cmd, env=env, timeout=timeout, stdout=out, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired:
        raise Fail(f"timed out after {timeout:.0f} s: {short(cmd)}")
    finally:
        if logfile:
            out.close()
    if check and p.returncode != 0:
        tail = (p.stdout or "").strip().splitlines()[-1:] if not logfile else [f"see {logfile}"]
        raise Fail(f"exit {p.returncode}: {short(cmd)}: {' '.join(tail)}")
    return p


# ---------------------------------------------------------------- the root

def check_host() -> dict:
    if platform.system() != "Linux":
        raise Fail("needs Linux (debootstrap, chroot, binfmt_misc)")
    if os.geteuid() != 0:
        raise Fail("run as root (debootstrap, chroot and mounts need it)")
    for tool in ("debootstrap", "chroot", "mount"):
        if not shutil.which(tool):
            raise Fail(f"{tool} not found: apt-get install debootstrap qemu-user-static binfmt-support")
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if not qemu:
        raise Fail("qemu-aarch64-static not found: apt-get install qemu-user-static binfmt-support")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], check=False)
    entry = binfmt / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        if shutil.which("update-binfmts"):
            sh(["update-binfmts", "--enable", "qemu-aarch64"], check=False)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise Fail("binfmt_misc has no enabled qemu-aarch64 entry (apt-get install binfmt-support qemu-user-static)")
    if "F" not in next((l.split()[1] for l in entry.read_text().splitlines() if l.startswith("flags:")), ""):
        raise Fail("the qemu-aarch64 binfmt entry lacks the F flag: a chroot could not find the interpreter")
    version = sh([qemu, "--version"]).stdout.splitlines()[0]
    return {"qemu": version, "binfmt_interpreter": entry.read_text().splitlines()[1].split()[-1]}


def root_ready(root: Path) -> bool:
    return (root / "usr/bin/python3").exists() and (root / "usr/bin/g++").exists() \
        and not (root / "debootstrap").exists()


def build_root(root: Path, suite: str, mirror: str, logs: Path) -> dict:
    stamp = logs / "debootstrap-seconds"
    if root_ready(root):
        log(f"reusing the arm64 root {root}")
        return {"built": False, **({"seconds_when_built": int(stamp.read_text())} if stamp.exists() else {})}
    if root.exists() and any(root.iterdir()):
        raise Fail(f"{root} exists but is not a finished debootstrap root: remove it or pick another --root")
    log(f"debootstrap --arch=arm64 {suite} into {root} (slow under emulation; log {logs / 'debootstrap.log'})")
    t = time.monotonic()
    sh(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}", suite, str(root), mirror],
       logfile=logs / "debootstrap.log", timeout=3600)
    seconds = round(time.monotonic() - t)
    stamp.write_text(f"{seconds}\n")
    return {"built": True, "seconds_when_built": seconds}


class Mounts:
    """/proc and /dev inside the root for the duration of the run."""

    def __init__(self, root: Path):
        self.root, self.done = root, []

    def __enter__(self):
        # no /sys: with the host's /sys (and the host's x86 /proc/cpuinfo, which qemu-user passes
        # through) onnxruntime's cpuinfo library crashes the emulated process; without it cpuinfo
        # gives up and onnxruntime reads the CPU features from the (emulated) HWCAPs instead
        for src, dst, args in (("proc", "proc", ["-t", "proc"]), ("/dev", "dev", ["--bind"])):
            target = self.root / dst
            if os.path.ismount(target):
                continue
            sh(["mount", *args, src, str(target)])
            self.done.append(target)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        # a host behind a TLS-intercepting proxy trusts extra CAs: pip in the root gets the host's bundle
        host_ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
        if os.path.isfile(host_ca):
            shutil.copy(host_ca, self.root / HOST_CA.lstrip("/"))
        return self

    def __exit__(self, *exc):
        for target in reversed(self.done):
            sh(["umount", "-l", str(target)], check=False)


def chroot_env(extra: dict | None = None) -> dict:
    env = {"PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1", "PIP_CERT": HOST_CA}
    env.update(extra or {})
    return env


def inroot(root: Path, args: list[str], **kw) -> subprocess.CompletedProcess:
    return sh([CHROOT, str(root), *args], env=chroot_env(kw.pop("env", None)), **kw)


def copy_source(root: Path) -> None:
    dst = root / SRC.lstrip("/")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("rissole_edge", "models", "export"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)


def install(root: Path, hnswlib: str, logs: Path) -> dict:
    py = f"{VENV}/bin/python"
    pip = [py, "-m", "pip", "install", "--no-cache-dir"]
    if not (root / VENV.lstrip("/") / "bin/python").exists():
        log("creating the venv in the root")
        inroot(root, ["python3", "-m", "venv", VENV])
    have = inroot(root, [py, "-c", "import importlib.metadata as m, sys\n"
                                   "for d in ('hnswlib', 'chroma-hnswlib'):\n"
                                   "    try: m.version(d); print(d); break\n"
                                   "    except m.PackageNotFoundError: pass"]).stdout.strip()
    variant = have or None
    if variant and hnswlib not in ("auto", {"hnswlib": "sdist", "chroma-hnswlib": "chroma"}[variant]):
        variant = None                      # the other flavour was asked for: replace it
        inroot(root, [py, "-m", "pip", "uninstall", "-y", "hnswlib", "chroma-hnswlib"], check=False)
    t = time.monotonic()
    if not variant and hnswlib in ("auto", "sdist"):
        log("compiling hnswlib from its sdist inside the root (HNSWLIB_NO_NATIVE=1; minutes under emulation)")
        p = inroot(root, [*pip, "--no-binary", "hnswlib", "hnswlib>=0.8"], env={"HNSWLIB_NO_NATIVE": "1"},
                   timeout=3600, check=False, logfile=logs / "pip-hnswlib.log")
        if p.returncode == 0:
            variant = "hnswlib"
        elif "Could not fetch URL" in (logs / "pip-hnswlib.log").read_text():
            raise Fail(f"pip in the root cannot reach PyPI: see {logs / 'pip-hnswlib.log'}")
        elif hnswlib == "sdist":
            raise Fail(f"hnswlib did not compile in the root: see {logs / 'pip-hnswlib.log'}")
        else:
            log("hnswlib did not compile: falling back to the chroma-hnswlib wheels")
    if not variant:
        inroot(root, [*pip, "chroma-hnswlib"], timeout=1800, logfile=logs / "pip-chroma-hnswlib.log")
        variant = "chroma-hnswlib"
    hnsw_s = round(time.monotonic() - t)
    stamp = logs / "hnswlib-install-seconds"
    if hnsw_s > 5:
        stamp.write_text(f"{hnsw_s}\n")
    elif stamp.exists():
        hnsw_s = int(stamp.read_text())         # installed by an earlier run: keep its time
    log("installing rissole-edge from this source tree into the root")
    copy_source(root)
    t = time.monotonic()
    deps = ["onnxruntime>=1.17", "numpy>=1.24", "pillow>=10", "typer>=0.12"]
    inroot(root, [*pip, *deps], timeout=1800, logfile=logs / "pip-deps.log")
    inroot(root, [*pip, "--force-reinstall", "--no-deps", SRC], timeout=1800, logfile=logs / "pip-rissole.log")
    # `pip check`: with the real hnswlib every declared dependency is met; chroma-hnswlib provides
    # `import hnswlib` under another distribution name, so there pip reports hnswlib as missing
    check = inroot(root, [py, "-m", "pip", "check"], check=False).stdout.strip()
    return {"hnswlib_variant": variant, "hnswlib_seconds": hnsw_s, "install_seconds": round(time.monotonic() - t),
            "pip": {"hnswlib": ("HNSWLIB_NO_NATIVE=1 pip install --no-binary hnswlib 'hnswlib>=0.8'"
                                if variant == "hnswlib" else "pip install chroma-hnswlib"),
                    "deps": "pip install " + " ".join(f"'{d}'" for d in deps),
                    "rissole-edge": f"pip install --force-reinstall --no-deps {SRC}"},
            "pip_check": check}


VERSIONS = r"""
import ctypes, importlib.metadata as m, json, os, platform, struct, sys
def dist(name):
    try: return m.version(name)
    except m.PackageNotFoundError: return None
def wheel_tags(name):
    try: d = m.distribution(name)
    except m.PackageNotFoundError: return None
    text = d.read_text("WHEEL") or ""
    return [l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("Tag:")]
hw = {}
try:
    raw = open("/proc/self/auxv", "rb").read()
    for i in range(0, len(raw), 16):
        k, v = struct.unpack("<QQ", raw[i:i + 16])
        if k in (16, 26): hw[{16: "hwcap", 26: "hwcap2"}[k]] = v
except OSError: pass
feats = {}
if platform.machine() == "aarch64" and "hwcap" in hw:
    feats = {"asimd": bool(hw["hwcap"] >> 1 & 1), "asimddp (dotprod)": bool(hw["hwcap"] >> 20 & 1),
             "i8mm": bool(hw.get("hwcap2", 0) >> 13 & 1), "sve": bool(hw["hwcap"] >> 22 & 1)}
import onnxruntime, numpy, hnswlib, PIL
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
    "glibc": os.confstr("CS_GNU_LIBC_VERSION"), "onnxruntime": onnxruntime.__version__,
    "onnxruntime_wheel_tags": wheel_tags("onnxruntime"), "numpy": numpy.__version__,
    "numpy_wheel_tags": wheel_tags("numpy"), "pillow": PIL.__version__,
    "hnswlib": {"distribution": "hnswlib" if dist("hnswlib") else "chroma-hnswlib",
                "version": dist("hnswlib") or dist("chroma-hnswlib"), "wheel_tags": wheel_tags("hnswlib") or wheel_tags("chroma-hnswlib")},
    "rissole_edge": dist("rissole-edge"), "cpu_features": feats}))
"""


def versions_in_root(root: Path, cpu: str | None) -> dict:
    env = {"QEMU_CPU": cpu} if cpu else None
    # stderr is merged in: onnxruntime's cpuinfo complains about the emulated /proc; the JSON is the last line
    v = json.loads(inroot(root, [f"{VENV}/bin/python", "-c", VERSIONS], env=env).stdout.strip().splitlines()[-1])
    os_release = (root / "etc/os-release").read_text()
    v["os"] = next(l.split("=", 1)[1].strip('"') for l in os_release.splitlines() if l.startswith("PRETTY_NAME="))
    return v


def x86_features() -> list[str]:
    """The x86 flags that pick onnxruntime's int8 kernels (VNNI, AVX-512, AVX2)."""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]


def versions_on_host() -> dict:
    return json.loads(sh([str(REPO / ".venv/bin/python"), "-c", VERSIONS]).stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- generate and compare

def run_generate(cmd: list[str], env: dict, errlog: Path) -> tuple[dict, float, int]:
    """Fork, exec `cmd`, and wait4 it: the rusage is that child's own (ru_maxrss = its VmHWM)."""
    r, w = os.pipe()
    t = time.monotonic()
    pid = os.fork()
    if pid == 0:                                        # child
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(os.open(errlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            os.execvpe(cmd[0], cmd, env)
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        last = (errlog.read_text().strip().splitlines() or [""])[-1]
        raise Fail(f"exit {code}{' (' + signal.Signals(-code).name + ')' if code < 0 else ''}: {short(cmd)}: {last}")
    return json.loads(out), wall, usage.ru_maxrss * 1024


def read_png(path: Path) -> np.ndarray:
    """A generated PNG's pixels, decoded by Pillow."""
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
        raise Fail(f"{path} is not a readable PNG: {e}") from None


def compare(a: list[Path], b: list[Path]) -> dict:
    if len(a) != len(b) or not a:
        raise Fail(f"image counts differ: {len(a)} vs {len(b)}")
    psnrs, exact, maxdiff = [], 0, 0
    for pa, pb in zip(a, b):
        ia, ib = read_png(pa), read_png(pb)
        if ia.shape != ib.shape:
            raise Fail(f"{pa} and {pb} differ in shape")
        d = ia.astype(np.int64) - ib.astype(np.int64)
        mse = float(np.mean(d * d))
        maxdiff = max(maxdiff, int(np.abs(d).max()))
        exact += mse == 0
        psnrs.append(math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse))
    finite = [p for p in psnrs if math.isfinite(p)]
    return {"images": len(a), "exact_images": exact, "all_exact": exact == len(a), "max_abs_diff": maxdiff,
            "psnr_min_db": round(min(psnrs), 2) if finite else "inf",
            "psnr_mean_db": (round(sum(finite) / len(finite), 2) if len(finite) == len(psnrs) else
                             ("inf" if not finite else f"{round(sum(finite) / len(finite), 2)} over the {len(finite)} inexact")),
            "psnr_db": [round(p, 2) if math.isfinite(p) else "inf" for p in psnrs]}


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/var/tmp/arm64-root"), help="the arm64 Debian root (reused)")
    ap.add_argument("--suite", default="bookworm")
    ap.add_argument("--mirror", default="http://deb.debian.org/debian")
    ap.add_argument("--bundle", action="append", help=f"repeatable; default: {', '.join(DEFAULT_BUNDLES)} (those present)")
    ap.add_argument("--export", action="store_true", help=f"export the missing /tmp/fm-*.rissole bundles from {RUN} first")
    ap.add_argument("--hnswlib", choices=["auto", "sdist", "chroma"], default="auto")
    ap.add_argument("--cpu", action="append", help="QEMU_CPU models to run on (repeatable; default cortex-a72 = Pi 4, "
                                                   "cortex-a76 = Pi 5)")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/aarch64.json")
    args = ap.parse_args()
    cpus = args.cpu or ["cortex-a72", "cortex-a76"]
    phases: dict[str, float] = {}
    try:
        if not HOST_CLI.exists():
            raise Fail(f"{HOST_CLI} not found: the x86 side runs with the repository's venv")
        host = check_host()
        logs = args.root.parent / (args.root.name + "-logs")
        logs.mkdir(parents=True, exist_ok=True)

        bundles = [Path(b) for b in (args.bundle or DEFAULT_BUNDLES)]
        bundles = [b if b.is_absolute() else REPO / b for b in bundles]
        t = time.monotonic()
        for b in bundles:
            if not b.exists() and args.export and str(b) in EXPORTS:
                log(f"exporting {b} from {RUN}")
                sh([str(HOST_CLI), "export", str(REPO / RUN), "-o", str(b), *EXPORTS[str(b)], "--db-limit", "15000"],
                   timeout=3600)
        phases["export_s"] = round(time.monotonic() - t)
        missing = [b for b in bundles if not b.exists()]
        if args.bundle and missing:
            raise Fail(f"no such bundle: {missing[0]}")
        bundles = [b for b in bundles if b.exists()]
        for b in missing:
            log(f"skipping {b}: not there (--export makes it)")

        t = time.monotonic()
        built = build_root(args.root, args.suite, args.mirror, logs)
        phases["root_s"] = round(time.monotonic() - t)
        with Mounts(args.root):
            t = time.monotonic()
            installed = install(args.root, args.hnswlib, logs)
            phases["install_s"] = round(time.monotonic() - t)
            arm = {cpu: versions_in_root(args.root, cpu) for cpu in cpus}
            x86 = versions_on_host()

            gen = ["generate", "-n", str(args.n), "--seed", str(args.seed), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--json"]
            runs: dict[str, dict] = {}
            t = time.monotonic()
            (args.root / BUNDLES.lstrip("/")).mkdir(parents=True, exist_ok=True)
            for b in bundles:
                shutil.copy(b, args.root / BUNDLES.lstrip("/") / b.name)
                name, entry = b.stem, {"bundle": str(b.relative_to(REPO) if b.is_relative_to(REPO) else b)}
                info = json.loads(sh([str(HOST_CLI), "info", str(b), "--json"]).stdout)
                entry["quantization_detail"] = info.get("quantization")
                out_x86 = args.root.parent / (args.root.name + "-x86-out") / name
                shutil.rmtree(out_x86, ignore_errors=True)
                cmd = [str(HOST_CLI), *gen, "-m", str(b), "-o", str(out_x86)]
                log(f"x86: {name}")
                rep, wall, rss = run_generate(cmd, {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                                              logs / f"generate-x86-{name}.log")
                entry["x86"] = {"command": " ".join(["rissole-edge", *gen, "-m", b.name, "-o", "OUT"]),
                                "peak_rss_mb_cli": rep["peak_rss_mb"], "peak_rss_mb_wait4": round(rss / 2 ** 20, 1),
                                "generate_s": rep["generate_s"], "wall_s": round(wall, 1),
                                "images": [str(p) for p in rep["images"]]}
                for cpu in cpus:
                    out_arm = f"{OUTS}/{cpu}/{name}"
                    shutil.rmtree(args.root / out_arm.lstrip("/"), ignore_errors=True)
                    cmd = [CHROOT, str(args.root), f"{VENV}/bin/rissole-edge", *gen, "-m", f"{BUNDLES}/{b.name}",
                           "-o", out_arm]
                    log(f"aarch64 ({cpu}, emulated): {name}")
                    rep, wall, rss = run_generate(cmd, chroot_env({"QEMU_CPU": cpu}), logs / f"generate-{cpu}-{name}.log")
                    imgs = [args.root / p.lstrip("/") for p in rep["images"]]
                    entry[f"aarch64-{cpu}"] = {
                        "command": f"QEMU_CPU={cpu} chroot {args.root} {VENV}/bin/rissole-edge {' '.join(gen)} "
                                   f"-m {BUNDLES}/{b.name} -o {out_arm}",
                        "peak_rss_mb_cli": rep["peak_rss_mb"], "peak_rss_mb_wait4": round(rss / 2 ** 20, 1),
                        "generate_s_emulated_not_representative": rep["generate_s"], "wall_s": round(wall, 1),
                        "vs_x86_same_bundle": compare([Path(p) for p in entry["x86"]["images"]], imgs),
                        "images": [str(p) for p in imgs]}
                first = [Path(p) for p in entry[f"aarch64-{cpus[0]}"]["images"]]
                entry["aarch64_cpu_models_identical"] = all(
                    compare(first, [Path(p) for p in entry[f"aarch64-{c}"]["images"]])["all_exact"] for c in cpus[1:])
                runs[name] = entry
            # cross-bundle parity: each quantized bundle against the fp32 bundle on x86 (reference)
            ref = next((r for r in runs.values() if (r["quantization_detail"] or {}).get("mode") == "fp32"), None)
            if ref is not None:
                ref_imgs = [Path(p) for p in ref["x86"]["images"]]
                for name, r in runs.items():
                    if r is ref:
                        continue
                    r["x86_vs_fp32_x86"] = compare(ref_imgs, [Path(p) for p in r["x86"]["images"]])
                    for cpu in cpus:
                        r[f"aarch64-{cpu}"]["vs_fp32_x86"] = compare(ref_imgs, [Path(p) for p in r[f"aarch64-{cpu}"]["images"]])
            phases["generate_s"] = round(time.monotonic() - t)
    except Fail as e:
        print(f"aarch64: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"aarch64: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aarch64: interrupted", file=sys.stderr)
        return 130

    result = {
        "what": "rissole-edge on aarch64 under qemu-user emulation (Debian arm64 root) vs x86, same bundles and seed",
        "date": datetime.date.today().isoformat(),
        "settings": {"n": args.n, "steps": args.steps, "seed": args.seed, "threads": args.threads, "sampler": "ddim"},
        "host": {**host, "x86": x86, "kernel": platform.release(), "x86_int8_features": x86_features()},
        "bundle_exports": {b: f"rissole-edge export {RUN} -o {b} {' '.join(a)} --db-limit 15000" for b, a in EXPORTS.items()},
        "root": {"path": str(args.root), "suite": args.suite, "mirror": args.mirror, "packages": PACKAGES, **built},
        "install": installed,
        "aarch64": arm,
        "bundles": runs,
        "phases_s": phases,
        "caveats": [
            "Emulated: qemu-user translates aarch64 code to x86, so correctness and memory are checked, speed is not; "
            "all aarch64 timings are emulated, not representative of a board.",
            "Peak RSS under qemu-user is that of the emulated process as the host kernel counts it "
            "(VmHWM via the CLI; ru_maxrss via wait4): qemu's own translator and code cache are included.",
            "QEMU_CPU picks the CPU model and so the HWCAPs onnxruntime sees: cortex-a72 (Pi 4) has no dotprod, "
            "cortex-a76 (Pi 5) has dotprod; neither has i8mm.",
            "No real board was used.",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, cpus))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def markdown(r: dict, cpus: list[str]) -> str:
    a = r["aarch64"][cpus[0]]
    s = r["settings"]
    lines = [
        "# rissole-edge on aarch64 (qemu-user emulation)", "",
        f"Generated by `benchmarks/aarch64.py` on {r['date']}: -n {s['n']} --steps {s['steps']} --seed {s['seed']} "
        f"--threads {s['threads']} (ddim). aarch64 = {a['os']} arm64 root under {r['host']['qemu']}.", "",
        f"aarch64: Python {a['python']}, {a['glibc']}, onnxruntime {a['onnxruntime']} "
        f"(wheel {', '.join(a['onnxruntime_wheel_tags'] or [])}), numpy {a['numpy']}, "
        f"{a['hnswlib']['distribution']} {a['hnswlib']['version']} "
        f"({'compiled from sdist, HNSWLIB_NO_NATIVE=1' if a['hnswlib']['distribution'] == 'hnswlib' else 'wheel'}). "
        f"x86: Python {r['host']['x86']['python']}, onnxruntime {r['host']['x86']['onnxruntime']}.", "",
        "| bundle | quantization | CPU model | exact vs x86 | PSNR vs x86 min / mean (dB) | max abs diff | "
        "PSNR vs fp32 on x86 min / mean (dB) | peak RSS aarch64 (MB) | peak RSS x86 (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in r["bundles"].items():
        q = b.get("quantization_detail") or {}
        qs = f"int8 {q.get('target')} ({q.get('activations')}/{q.get('weights')})" if q.get("mode") == "int8" else q.get("mode", "?")
        xf = b.get("x86_vs_fp32_x86")
        lines.append(f"| {name} | {qs} | x86 (host) | - | - | - | "
                     f"{(str(xf['psnr_min_db']) + ' / ' + str(xf['psnr_mean_db'])) if xf else 'reference'} | - | "
                     f"{b['x86']['peak_rss_mb_cli']} |")
        for cpu in cpus:
            e = b[f"aarch64-{cpu}"]
            v, f = e["vs_x86_same_bundle"], e.get("vs_fp32_x86")
            lines.append(f"| {name} | {qs} | {cpu} | {v['exact_images']}/{v['images']} | {v['psnr_min_db']} / "
                         f"{v['psnr_mean_db']} | {v['max_abs_diff']} | "
                         f"{(str(f['psnr_min_db']) + ' / ' + str(f['psnr_mean_db'])) if f else 'reference'} | "
                         f"{e['peak_rss_mb_cli']} | {b['x86']['peak_rss_mb_cli']} |")
    same = [n for n, b in r["bundles"].items() if b.get("aarch64_cpu_models_identical")]
    if len(cpus) > 1:
        lines += ["", f"Images identical across the emulated CPU models ({', '.join(cpus)}): "
                  f"{', '.join(same) if same else 'none'} of {', '.join(r['bundles'])}."]
    lines += ["", "Peak RSS on aarch64 is the emulated process's VmHWM as the host kernel counts it, qemu's own "
              "memory included. Timings under emulation are not representative and are kept only in the JSON.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

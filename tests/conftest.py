"""Shared fixtures: the committed image sample and one tiny trained run per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# torch on one thread, in this process and in every CLI subprocess (they inherit the
# environment), unless the caller sets OMP_NUM_THREADS: with two threads per process on a busy
# 2-core machine, threads spin against each other. Training the tiny run took 13-26 s with one
# thread against 44-161 s with two (interleaved, load average 7-12). Results stay deterministic:
# each comparison in the suite is between runs made the same way.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SAMPLE = Path(__file__).parent / "data" / "fashion-sample"
# A run small enough for tests: 16x16 images, 4x4 latent, 2x2 blocks of 2x2.
TINY_OVERRIDES = """
seed = 1
checkpoint_every = 20
sample_every = 1000
[data]
size = 16
[autoencoder]
steps = 80
[denoiser]
steps = 60
"""


def cli(*args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script the way a user would. No timeout: on a busy machine a
    command is only slower, and a time cap would turn load into failures."""
    proc = subprocess.run([sys.executable, "-m", "rissole_edge", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"rissole-edge {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def train_variant(tiny_run: Path, tiny_config: Path, out: Path, kind: str = "block", settings: str = "") -> Path:
    """Train a denoiser of another kind, or with other [denoiser] `settings` (TOML lines), on the
    tiny run's autoencoder and database (--reuse). Its config is `out`.toml beside `out`."""
    variant = out.parent / f"{out.name}.toml"
    variant.write_text(tiny_config.read_text().replace("[denoiser]", f"[denoiser]\nkind = \"{kind}\"\n{settings}"))
    cli("train", str(SAMPLE), "--out", str(out), "--preset", "tiny", "--config", str(variant),
        "--reuse", str(tiny_run), check=True)
    return out


# Tests that use these fixtures train or export a model (tens of seconds on a busy 2-core
# machine, once per session): they are `slow`, whether or not they say so themselves.
TRAINED_FIXTURES = {"tiny_run", "tiny_bundle"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(TINY_OVERRIDES)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    """A complete run (all three stages) on the committed sample."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    cli("train", str(SAMPLE), "--out", str(run), "--preset", "tiny", "--config", str(tiny_config), check=True)
    return run


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported to an int8 bundle."""
    out = tmp_path_factory.mktemp("bundles") / "tiny.rissole"
    cli("export", str(tiny_run), "-o", str(out), "--calibration-samples", "8", check=True)
    return out

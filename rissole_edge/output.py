"""Where `generate` puts its PNGs: names, the checks made before any work, and writing each
group as soon as it is finished.

Writing as groups finish (instead of once at the end) means an interrupted or failed run keeps
every finished image; each PNG is written atomically, so none is ever half-written. Existing
files are never replaced silently: a rerun with other settings would otherwise overwrite
yesterday's images under the same names. Without a folder named, each run gets a new one
(generated/001, generated/002, ...), so that following a tutorial twice never fails or clobbers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import images
from .errors import UsageError


DEFAULT_ROOT = Path("generated")


class ImageWriter:
    """`DIR/seed{S}-{i:04d}.png` per image, plus an optional grid file. `folder` None: a new
    numbered folder under generated/, claimed when the first group is written."""

    def __init__(self, folder: Path | None, seed: int, grid_file: Path | None = None):
        self.fresh = folder is None
        self.folder = DEFAULT_ROOT / "NNN" if folder is None else Path(folder)
        self.seed, self.grid_file = seed, grid_file
        self.written: list[Path] = []
        self.total = 0

    def path(self, i: int) -> Path:
        return self.folder / f"seed{self.seed}-{i:04d}.png"

    def check(self, n: int, overwrite: bool) -> None:
        """Before any work: the folders must be writable, and without `overwrite` no output
        file may exist yet (refused with the first one named)."""
        self.total = n
        for folder in [self.folder.parent if self.fresh else self.folder] + \
                ([self.grid_file.parent] if self.grid_file else []):
            target = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
            if not target.is_dir() or not os.access(target, os.W_OK | os.X_OK):
                raise UsageError(f"cannot write to {folder}: not a writable folder")
        if overwrite:
            return
        targets = ([] if self.fresh else [self.path(i) for i in range(n)]) + ([self.grid_file] if self.grid_file else [])
        existing = [p for p in targets if p.exists()]
        if existing:
            what = f"{existing[0]} and {len(existing) - 1} more files already exist" if len(existing) > 1 \
                else f"{existing[0]} already exists"
            raise UsageError(f"{what}: pass --overwrite to replace them, or choose another -o folder, "
                             "--seed or --grid file")

    def write_group(self, first: int, pixels: np.ndarray) -> None:
        """Save images first, first + 1, ... (uint8 (len, H, W, C)) now. A Ctrl-C meanwhile
        takes effect once the group is on disk (a few ms), so that the count of written images
        that the CLI reports is exact."""
        with _interrupts_deferred():
            try:
                if self.fresh:
                    self._claim()
                self.folder.mkdir(parents=True, exist_ok=True)
                for i, p in enumerate(pixels, start=first):
                    path = self.path(i)
                    images.save_png(p, path)
                    self.written.append(path)
            except OSError as e:
                raise UsageError(f"cannot write images: {e.strerror or e}; {self.summary()}") from None

    def _claim(self) -> None:
        """Make the next free generated/NNN (mkdir is atomic, so two runs never share one)."""
        DEFAULT_ROOT.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name) for p in DEFAULT_ROOT.iterdir() if p.name.isdigit()]
        number = max(taken, default=0) + 1
        while True:
            try:
                (DEFAULT_ROOT / f"{number:03d}").mkdir()
                break
            except FileExistsError:
                number += 1
        self.folder, self.fresh = DEFAULT_ROOT / f"{number:03d}", False

    def write_grid(self, pixels: np.ndarray) -> None:
        """All images (uint8 (n, H, W, C)) as one grid PNG, if a grid file was asked for."""
        if self.grid_file is None:
            return
        try:
            images.save_png(images.grid([images.to_pil(p) for p in pixels]), self.grid_file)
        except OSError as e:
            raise UsageError(f"cannot write {self.grid_file}: {e.strerror or e}") from None

    def summary(self) -> str:
        return f"{len(self.written)} of {self.total} images were written to {self.folder}"


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block ends, then raise KeyboardInterrupt if one came (only the main
    thread can set signal handlers; elsewhere the block runs as it is). A process started with
    SIGINT ignored (`cmd &` in a script) keeps ignoring it here too: a
    handler only while a group is written would stop such a run at random."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt

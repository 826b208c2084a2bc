"""A dependency-free progress line on stderr: drawn on a terminal, silent when piped."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, start: int = 0, enabled: bool | None = None):
        self.total, self.label, self.start = total, label, start
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, note: str = "") -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done < self.total):
            return
        self.last = now
        frac = done / max(self.total, 1)
        bar = "#" * int(frac * 24)
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        sys.stderr.write(f"\r{self.label} [{bar:<24}] {done}/{self.total} {rate:.1f}/s {note}\033[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

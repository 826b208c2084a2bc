"""The memory planner: how many blocks one denoiser call may take so that the whole process's
peak RSS stays under the user's budget, and whether the budget can work at all.

Figures come from the OS (/proc/self/status: VmRSS now, VmHWM peak) plus the activation bytes
per block and per decoded image that the exporter measured on the ONNX graphs (manifest).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError

MiB = 1 << 20
UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB, "mib": MiB,
         "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
MARGIN = 12 * MiB           # allocator slack, Python objects, numpy temporaries, PNG encoding
IMAGES_PER_GROUP = 16       # images whose conditions and latents are held at once under a budget
SESSION_INIT = 18 * MiB     # onnxruntime's first session (thread pools, kernels), measured on x86_64
MAX_BATCH_BLOCKS = 256      # past this, bigger calls stop getting faster on a CPU


def parse_size(text: str) -> int:
    """'96MB', '96M', '1.5GiB', '100000000' -> bytes (K/M/G are binary: 1 MB = 2**20 bytes)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise UsageError(f"cannot read memory size {text!r}: use e.g. 96MB, 512MiB or 1GB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def rss() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes, as the OS counts them."""
    values = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line[:5]] = int(line.split()[1]) * 1024
    except OSError:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def mb(n: int) -> str:
    """Whole MB, rounded up: a minimum printed this way is always enough."""
    return f"{-(-n // MiB)}MB"


@dataclass(frozen=True)
class Plan:
    """How a Generator works within its budget."""
    blocks_per_call: int       # blocks denoised together (across images)
    images_per_decode: int
    budget: int | None
    images_per_group: int = 1 << 30   # images generated together; bounded under a budget
    passes: int = 1            # denoiser rows per block per call (2: guidance's cond + uncond rows)

    def describe(self) -> str:
        return (f"{self.blocks_per_call} blocks per denoiser call, {self.images_per_decode} images per "
                f"decoder call" + (f", budget {mb(self.budget)}" if self.budget else ""))


def check_before_loading(budget: int | None, load_bytes: int) -> None:
    """Refuse a budget that loading the bundle alone would exceed, before loading it."""
    if budget is None:
        return
    now, _ = rss()
    need = now + SESSION_INIT + load_bytes + MARGIN
    if need > budget:
        raise UsageError(f"memory budget {mb(budget)} is below what this bundle needs: "
                         f"at least {mb(need)}")


def make_plan(budget: int | None, block_bytes: int, image_bytes: int, positions: int, passes: int = 1) -> Plan:
    """Blocks per call and images per decode that fit next to what the process holds now; a
    block costs `passes` rows of a denoiser call (2 under guidance: cond and uncond together)."""
    if budget is None:
        # Groups stay bounded even without a budget, so that a caller gets finished images as it
        # goes (the CLI writes them), while one group still fills a whole denoiser call.
        return Plan(MAX_BATCH_BLOCKS // passes, 16, None,
                    max(IMAGES_PER_GROUP, MAX_BATCH_BLOCKS // max(positions, 1)), passes)
    now, peak = rss()
    base = max(now, peak)
    minimum = base + passes * block_bytes + image_bytes + MARGIN
    if budget < minimum:
        raise UsageError(f"memory budget {mb(budget)} is below what this bundle needs: "
                         f"at least {mb(minimum)}")
    free = budget - base - MARGIN
    blocks = max(1, min(MAX_BATCH_BLOCKS, (free - image_bytes) // max(block_bytes, 1)) // passes)
    images = max(1, min(16, free // max(image_bytes, 1), blocks // max(positions, 1) or 1))
    return Plan(int(blocks), int(images), budget, IMAGES_PER_GROUP, passes)

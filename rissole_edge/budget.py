"""The memory planner: how many denoiser rows may be in flight and how many images one
decoder call may take so that the process's peak RSS stays under the user's budget, and the
smallest budget that can work.

The figures are a model of where the bytes go, each part measured on x86_64 with
`benchmarks/memory.py` (benchmarks/results/memory.md): what a fresh process holds once it has
imported the runtime and its CLI (RUNTIME_BASE), onnxruntime's environment, each session (a
multiple of its model's bytes), the other members as loaded, the activations of a denoiser
row (the exporter's count for the bundle, an upper bound) and of a decoded pixel. So the
minimum is a function of the bundle and the plan alone, and the CLI, the API and the README
give the same figure. A process that already holds more than RUNTIME_BASE when it opens a
bundle (an app with other work) is planned from what it holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    from .bundle import Bundle, Spec

MiB = 1 << 20
UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB, "mib": MiB,
         "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
RUNTIME_BASE = 56 * MiB      # python, numpy (with numpy.random), onnxruntime, rissole_edge and its CLI: measured
                             # 52.4 MB on x86_64 CPython 3.11; and Pillow (3 MB), which --like, --grid, --preview load
ORT_ENV = 12 * MiB           # onnxruntime's environment and kernel code, paged in by the first session
SESSION_PER_MODEL_BYTE = 3.5 # a session holds its graph, its weights and their prepacked copies
INDEX_FIXED = 3 * MiB        # hnswlib's own tables beside the index (locks, label map)
INDEX_PER_BYTE = 1.2         # hnswlib's copy of the index member
PARSE_PER_BYTE = 2           # an .npy member: its bytes and the array parsed from them
DECODER_FIXED = 2 * MiB      # the decoder's first call, whatever its size
DECODER_PER_PIXEL = 900      # activation bytes per decoded pixel (the shipped decoders: 820-850)
MARGIN = 4 * MiB             # allocator slack, Python objects, numpy temporaries, PNG encoding
DEFAULT_ROWS = 128           # rows in flight without a budget: 96 peaked 2.8 MB lower at generate -n 1000
                             # for 3.3% more CPU time (112: 1.3 MB, 0.4%; 64: 3.8 MB, 6.5%); 96 was the
                             # default until release_code_pages put the peak 12 MB under the 80 MB target
MAX_ROWS = 256
DECODE_PIXELS = 2048         # pixels per decoder call (2 fashion images, 1 twemoji): 4 were no faster, 1.6 MB bigger
IMAGES_PER_GROUP = 16        # images whose conditions and latents are held at once (at least)
MIN_ROWS_PER_SESSION = 16    # rows in flight each denoiser session must keep for a further one to be planned:
                             # 2 workers gain 1.64x at 16 fashion rows each (0.6 ms calls), 1.13x at 2 (threads.md)


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


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim). Opening a bundle frees
    more than it keeps (each member's bytes, onnxruntime's parse of each model), and glibc keeps
    freed heap pages resident: called after each session and the database are made, a default
    `generate -n 4` peaked 2.3 MB lower (benchmarks/results/memory.md). Nothing where there is no
    glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError, TypeError):      # not glibc (macOS, musl, Windows)
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def release_code_pages() -> int:
    """Drop this process's resident pages of library code and read-only data that are clean
    copies of their file: only the pages used again come back, as minor faults from the page
    cache. Imports run code once (module initialisers, onnxruntime's kernel registration) and
    so does opening a session (graph parsing and optimisers): Generator.open calls this before
    its first session and once it is open, and a default `generate` peaked 13-17 MB lower
    (benchmarks/results/memory.md). These are pages the kernel would also reclaim under
    memory pressure: the saving is real resident memory, but cheap memory.

    Only mappings that cannot differ from their file are touched (`droppable`): a shared
    library's (never an app's own file mappings, which it might unmap meanwhile), never writable
    now, no page written or copied on write (Private_Dirty, Shared_Dirty and Anonymous all 0 in
    /proc/self/smaps), no device or locked memory. For such a mapping
    madvise(MADV_DONTNEED) only drops page-table entries, as reclaim would: the next access
    rereads identical bytes. A writable mapping or one with a written page (relocated data)
    would lose its contents, so none is ever chosen. Returns the resident bytes of the mappings
    dropped; 0, doing nothing, where there is no /proc/self/smaps or no madvise (not Linux)."""
    global _madvise
    if _madvise is None:
        try:
            import ctypes
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise.restype = ctypes.c_int
        except (OSError, AttributeError, TypeError):       # no C library with madvise (Windows)
            _madvise = False
    if not _madvise:
        return 0
    try:
        with open("/proc/self/smaps") as f:
            chosen = droppable(f.read())
    except OSError:                                        # not Linux, or /proc not mounted
        return 0
    return sum(resident for start, end, resident in chosen if _madvise(start, end - start, MADV_DONTNEED) == 0)


MADV_DONTNEED = 4            # the same value on every Linux architecture
_madvise = None
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+) *(.*)$", re.M)
_SHARED_OBJECT = re.compile(r"/.*\.so(\.[0-9]+)*( \(deleted\))?")    # .../libc.so.6, .../x.cpython-311-...so
# VmFlags of memory that is not plain page cache: I/O or PFN-mapped device memory, mixed maps,
# don't-dump (device memory), locked, hugetlb, userfaultfd-handled.
_NOT_PAGE_CACHE = {"io", "pf", "mm", "dd", "lo", "ht", "um", "uw"}


def droppable(smaps: str) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of the mappings in a /proc/PID/smaps text that
    `release_code_pages` may drop: a shared library's (inode not 0), not writable, resident, no
    dirty or anonymous page, plain page cache (VmFlags). A mapping missing any of these fields
    is not chosen."""
    heads = list(_HEADER.finditer(smaps))
    chosen = []
    for head, after in zip(heads, heads[1:] + [None]):
        start, end, perms, inode, path = head.groups()
        if "w" in perms or inode == "0" or not _SHARED_OBJECT.fullmatch(path):
            continue
        body = smaps[head.end():after.start() if after else len(smaps)]
        fields = dict(line.split(":", 1) for line in body.splitlines() if ":" in line)
        try:
            clean = all(int(fields[k].split()[0]) == 0 for k in ("Private_Dirty", "Shared_Dirty", "Anonymous"))
            resident = int(fields["Rss"].split()[0]) * 1024
            plain = not set(fields["VmFlags"].split()) & _NOT_PAGE_CACHE
        except (KeyError, ValueError, IndexError):
            continue
        if clean and plain and resident:
            chosen.append((int(start, 16), int(end, 16), resident))
    return chosen


def mb(n: int) -> str:
    """Whole MB, rounded up: a minimum printed this way is always enough."""
    return f"{-(-n // MiB)}MB"


def budget_text(n: int) -> str:
    """A budget as given, not rounded up (`mb` would print a 60-byte budget as 1MB); under 1 MB
    it names the likely slip: a number without a unit is bytes."""
    return f"{n / MiB:g}MB" if n >= MiB else f"{n} bytes (a number without a unit is bytes: did you mean {n}MB?)"


@dataclass(frozen=True)
class Plan:
    """How a Generator works within its budget."""
    blocks_per_call: int       # blocks in flight: one call's, or shared by the worker threads' calls
    images_per_decode: int
    budget: int | None
    images_per_group: int = IMAGES_PER_GROUP   # images generated together
    passes: int = 1            # denoiser rows per block per call (2: guidance's cond + uncond rows)
    sessions: int = 1          # denoiser sessions, one per worker thread: the most workers a group may take

    def describe(self) -> str:
        return (f"{self.blocks_per_call} blocks in flight per denoiser step, {self.images_per_decode} images per "
                f"decoder call, up to {self.sessions} denoiser session{'s' if self.sessions > 1 else ''}"
                + (f", budget {mb(self.budget)}" if self.budget else ""))


def passes(spec: Spec, guidance: float) -> int:
    """Denoiser rows per block per step: guidance runs the conditional and the unconditional
    pass of a block in the same call, so the planner must count both."""
    return 2 if spec.k and guidance != 1.0 else 1


def held(bundle: Bundle) -> int:
    """What an open Generator holds beyond the runtime's imports (bytes, before generating):
    onnxruntime's environment, a session per ONNX member and hnswlib's index (the encoder's
    session and the index load with the first --like query; counted, so that one fits) and the
    other members as loaded."""
    size = {name: m.size for name, m in bundle.members.items()}
    onnx = sum(n for name, n in size.items() if name.endswith(".onnx"))
    arrays = sum(n for name, n in size.items() if name.endswith(".npy"))
    index = INDEX_FIXED + INDEX_PER_BYTE * size.get("index.bin", 0)
    return int(ORT_ENV + SESSION_PER_MODEL_BYTE * onnx + index + PARSE_PER_BYTE * arrays)


def session_bytes(bundle: Bundle) -> int:
    """What one more denoiser session holds (a worker's own: `held` counts the first)."""
    return int(SESSION_PER_MODEL_BYTE * bundle.members["denoiser.onnx"].size)


def fixed(bundle: Bundle) -> int:
    """Bytes the process holds with the bundle open and before generating: the runtime (or
    what this process holds now, if more), the bundle, and a margin. Call it before opening."""
    return max(RUNTIME_BASE, rss()[0]) + held(bundle) + MARGIN


def decode_bytes(spec: Spec, images: int) -> int:
    per_image = max(spec.image_bytes, DECODER_PER_PIXEL * spec.image_size ** 2)
    return DECODER_FIXED + images * per_image


def minimum(spec: Spec, fixed_bytes: int, passes: int = 1) -> int:
    """The smallest budget that works: one block in flight (a whole image's P blocks for a
    border-conditioned denoiser, `spec.blocks_together`), one image per decoder call, next to
    `fixed_bytes` (`fixed(bundle)`)."""
    return fixed_bytes + passes * spec.blocks_together * spec.row_bytes + decode_bytes(spec, 1)


def make_plan(budget: int | None, spec: Spec, fixed_bytes: int, passes: int = 1,
              workers: int = 1, session_bytes: int = 0) -> Plan:
    """Blocks in flight, images per decode and denoiser sessions that fit in the budget next to
    `fixed_bytes` (`fixed`, taken before the bundle was opened); a block costs `passes` rows (2
    under guidance: cond and uncond in the same call). Refuses a budget below the minimum.

    Each worker thread beyond the first runs on a session of its own (1.61-1.70x one thread at
    32 fashion blocks per call, against 1.33-1.52x for two workers on one session:
    benchmarks/results/threads.md), `session_bytes` each (`session_bytes(bundle)`). Up to
    `workers` sessions are planned (without a budget, all of them; they are made when a group
    first takes that many workers), under a budget only as many as leave every session
    MIN_ROWS_PER_SESSION rows in flight; a budget with no room for a second session keeps
    one worker."""
    pixels = spec.image_size ** 2
    decode = max(1, DECODE_PIXELS // pixels)
    sessions = max(1, workers)
    if budget is None:
        rows = DEFAULT_ROWS
    else:
        least = minimum(spec, fixed_bytes, passes)
        if budget < least:
            raise UsageError(f"memory budget {budget_text(budget)} is below what this bundle needs: at least {mb(least)}")
        free = budget - fixed_bytes
        least_rows = passes * spec.blocks_together * spec.row_bytes
        while decode > 1 and (decode_bytes(spec, decode) > free // 2 or free - decode_bytes(spec, decode) < least_rows):
            decode //= 2

        def rows_with(count: int) -> int:     # rows in flight that fit beside `count` sessions
            return (free - decode_bytes(spec, decode) - (count - 1) * session_bytes) // max(spec.row_bytes, 1)

        sessions = next((s for s in range(sessions, 1, -1)
                         if rows_with(s) >= s * max(MIN_ROWS_PER_SESSION, passes * spec.blocks_together)), 1)
        rows = min(MAX_ROWS, rows_with(sessions))
    together = spec.blocks_together      # whole images per call when blocks see their neighbours
    blocks = max(together, rows // passes // together * together)
    # Groups hold enough blocks for two rounds of calls on every worker (without a budget; under
    # one, IMAGES_PER_GROUP), so that a caller gets finished images as it goes (the CLI writes them).
    group = IMAGES_PER_GROUP if budget else max(IMAGES_PER_GROUP, 2 * blocks // max(spec.positions, 1))
    return Plan(int(blocks), int(decode), budget, int(group), passes, sessions)

"""budget.release_code_pages: which mappings it may drop, that it drops nothing else in a real
process, and that generation after it gives the same pixels."""

import json
import re
import sys

import numpy as np
import pytest

from rissole_edge import budget
from rissole_edge.generator import Generator

LINUX = sys.platform.startswith("linux")


def _mapping(head: str, rss: int = 64, private_dirty: int = 0, shared_dirty: int = 0, anonymous: int = 0,
             flags: str | None = "rd ex mr mw me") -> str:
    lines = [head, "Size:                128 kB", f"Rss:                 {rss} kB", "Pss:                 64 kB",
             "Shared_Clean:          0 kB", f"Shared_Dirty:          {shared_dirty} kB",
             f"Private_Clean:        {rss} kB", f"Private_Dirty:         {private_dirty} kB",
             f"Anonymous:             {anonymous} kB", "Locked:                0 kB"]
    if flags is not None:
        lines.append(f"VmFlags: {flags}")
    return "\n".join(lines) + "\n"


LIB = "/usr/lib/x86_64-linux-gnu/libfoo.so.1"
SYNTHETIC = [  # (mapping text, chosen?)
    (_mapping(f"7f0000000000-7f0000020000 r--p 00000000 fe:00 1234   {LIB}", flags="rd mr mw me"), True),
    (_mapping(f"7f0000020000-7f0000040000 r-xp 00020000 fe:00 1234   {LIB}"), True),
    # relocated read-only data (RELRO): written once, then made read-only
    (_mapping(f"7f0000040000-7f0000042000 r--p 00040000 fe:00 1234   {LIB}", private_dirty=8, anonymous=8,
              flags="rd mr mw me ac"), False),
    # the library's data: writable, even where no page is written yet
    (_mapping(f"7f0000042000-7f0000044000 rw-p 00042000 fe:00 1234   {LIB}", flags="rd wr mr mw me ac"), False),
    (_mapping(f"7f0000044000-7f0000046000 rw-s 00000000 fe:00 99   /dev/shm/x", flags="rd wr sh mr mw me ms"), False),
    # code patched in place (text relocation, a debugger's breakpoint): copied on write
    (_mapping(f"7f0000050000-7f0000060000 r-xp 00000000 fe:00 77   /opt/textrel.so", private_dirty=4,
              anonymous=4), False),
    (_mapping(f"7f0000060000-7f0000070000 r-xp 00000000 fe:00 78   /opt/shared_dirty.so", shared_dirty=4), False),
    (_mapping("7f0000070000-7f0000080000 r--p 00000000 00:00 0 ", flags="rd mr mw me ac"), False),   # anonymous
    (_mapping("7f0000080000-7f0000084000 r--p 00000000 00:00 0                          [vvar]",
              flags="rd mr pf io de dd"), False),
    (_mapping("7f0000090000-7f00000a0000 r--s 00000000 00:05 12   /dev/fb0", flags="rd sh mr mw me ms io pf dd"),
     False),                                                                             # device memory
    (_mapping("7f00000a0000-7f00000b0000 r-xp 00000000 fe:00 79   /opt/locked.so", flags="rd ex mr mw me lo"),
     False),                                                                             # mlock'ed
    (_mapping("7f00000b0000-7f00000c0000 r-xp 00000000 fe:00 80   /opt/cold.so", rss=0), False),  # nothing resident
    (_mapping("7f00000c0000-7f00000d0000 r-xp 00000000 fe:00 81   /opt/old.so (deleted)"), True),
    (_mapping("7f00000d0000-7f00000e0000 r-xp 00000000 fe:00 82   /opt/truncated.so", flags=None), False),
    # a host app's own read-only files (it may unmap them at any time): left alone
    (_mapping("7f00000e0000-7f00000f0000 r--p 00000000 fe:00 83   /data/table.npy", flags="rd mr mw me"), False),
    (_mapping("7f00000f0000-7f0000100000 r--p 00000000 fe:00 84   /usr/lib/locale/locale-archive",
              flags="rd mr mw me"), False),
    (_mapping("7f0000100000-7f0000110000 r--s 00000000 fe:00 85   /x.so/notes.txt", flags="rd sh mr mw me ms"),
     False),
    (_mapping("7f0000110000-7f0000120000 r-xp 00000000 fe:00 86   /opt/lib/libbar.so.6.0.30"), True),
]


def test_droppable_chooses_only_clean_read_only_file_mappings():
    text = "".join(m for m, _ in SYNTHETIC)
    expected = []
    for mapping, chosen in SYNTHETIC:
        if chosen:
            start, end = (int(x, 16) for x in mapping.split()[0].split("-"))
            expected.append((start, end, 64 * 1024))
    assert budget.droppable(text) == expected
    assert budget.droppable("") == []


def _smaps() -> dict[int, dict]:
    """This process's mappings by start address: perms, file and the dirty/anonymous counts (an
    independent reading of /proc/self/smaps)."""
    out: dict[int, dict] = {}
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            if head and ":" not in line.split()[0]:
                current = out.setdefault(int(head.group(1), 16), {"end": int(head.group(2), 16),
                                                                   "perms": head.group(3),
                                                                   "file": line.split(maxsplit=5)[5:]})
            elif current is not None and line.split(":")[0] in ("Private_Dirty", "Shared_Dirty", "Anonymous"):
                current[line.split(":")[0]] = int(line.split()[1])
    return out


@pytest.mark.skipif(not LINUX, reason="release_code_pages does nothing without /proc/self/smaps")
def test_release_drops_whole_clean_read_only_mappings_only(monkeypatch):
    calls = []

    def record(start, length, advice):
        calls.append((start, length, advice))
        return 0

    np.linalg.norm(np.ones(100))          # some library code resident
    before = _smaps()
    monkeypatch.setattr(budget, "_madvise", record)
    assert budget.release_code_pages() > 0
    assert calls
    for start, length, advice in calls:
        mapping = before[start]
        assert advice == budget.MADV_DONTNEED and start + length == mapping["end"]
        assert "w" not in mapping["perms"]
        assert mapping["file"] and ".so" in mapping["file"][0].rsplit("/", 1)[-1]
        assert mapping["Private_Dirty"] == mapping["Shared_Dirty"] == mapping["Anonymous"] == 0


@pytest.mark.skipif(not LINUX, reason="release_code_pages does nothing without /proc/self/smaps")
def test_generation_after_dropping_code_pages_gives_the_same_pixels(monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(budget, "release_code_pages", lambda: 0)
        with Generator.open(threads=1) as gen:
            reference = gen.generate(4, seed=3, as_array=True)
    with Generator.open(threads=1) as gen:           # drops before its sessions and once open
        opened = gen.generate(4, seed=3, as_array=True)
        assert budget.release_code_pages() > 0
        again = gen.generate(4, seed=3, as_array=True)
    assert np.array_equal(reference, opened) and np.array_equal(reference, again)
    assert budget.release_code_pages() > 0           # the process keeps working: numpy, json, imports
    assert json.loads(json.dumps({"sum": float(np.sort(reference.ravel())[-10:].sum())}))["sum"] > 0
    import decimal
    assert str(decimal.Decimal("1.10") + decimal.Decimal("2.20")) == "3.30"


def test_release_is_a_no_op_without_smaps_or_madvise(monkeypatch):
    calls = []
    monkeypatch.setattr(budget, "_madvise", lambda *a: calls.append(a) or 0)

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/smaps")

    monkeypatch.setattr(budget, "open", no_proc, raising=False)      # macOS, or /proc not mounted
    assert budget.release_code_pages() == 0 and calls == []
    monkeypatch.setattr(budget, "_madvise", False)                     # no C library with madvise
    assert budget.release_code_pages() == 0

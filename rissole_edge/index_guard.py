"""Check an hnswlib index file before hnswlib parses it.

hnswlib's loader trusts the file: a crafted header makes it allocate at will, and a crafted
neighbour id makes a search read out of bounds. A bundle's checksums only prove the file is
what its producer wrote, so unsigned bundles from strangers are checked here: every header
field against the manifest, every neighbour id and label against the element count, and the
exact file length. The layout is that of hnswlib 0.8 `saveIndex` (64-bit size_t, little-endian).
"""

from __future__ import annotations

import struct

import numpy as np

from .bundle import BundleError

_HEADER = struct.Struct("<QQQQQQiIQQQdQ")   # offsetLevel0 .. ef_construction, 96 bytes


def check_index(data: bytes, elements: int, dim: int) -> None:
    """Raise BundleError unless `data` is a well-formed index of `elements` vectors of `dim`."""
    def bad(why: str) -> BundleError:
        return BundleError(f"the bundle's HNSW index is malformed: {why}")

    if len(data) < _HEADER.size:
        raise bad("shorter than its header")
    (offset0, max_elements, count, per_element, label_offset, data_offset, max_level, entry,
     max_m, max_m0, m, _mult, _efc) = _HEADER.unpack_from(data)
    links0 = max_m0 * 4 + 4
    expected = {"offsetLevel0": (offset0, 0), "element count": (count, elements),
                "max elements": (max_elements, elements), "M0": (max_m0, 2 * m), "maxM": (max_m, m),
                "data offset": (data_offset, links0), "label offset": (label_offset, links0 + 4 * dim),
                "element size": (per_element, links0 + 4 * dim + 8)}
    for name, (got, want) in expected.items():
        if got != want:
            raise bad(f"{name} is {got}, expected {want}")
    if not 1 <= m <= 1024 or not 0 <= max_level < 64 or not 0 <= entry < count:
        raise bad("impossible graph parameters")
    level0_end = _HEADER.size + count * per_element
    if len(data) < level0_end:
        raise bad("truncated level-0 data")
    def field(dtype: str, offset: int, width: int) -> np.ndarray:
        """Column `offset` of every level-0 element, `width` values wide: a view, no copy."""
        return np.ndarray((count, width), dtype, data, _HEADER.size + offset, (per_element, np.dtype(dtype).itemsize))

    sizes = field("<u2", 0, 1)[:, 0]
    ids = field("<u4", 4, max_m0)
    used = np.arange(max_m0)[None, :] < sizes[:, None]
    labels = field("<u8", label_offset, 1)[:, 0]
    vectors = field("<f4", data_offset, dim)
    if (sizes > max_m0).any() or (ids[used] >= count).any():
        raise bad("a level-0 neighbour list points outside the index")
    if not np.array_equal(np.sort(labels), np.arange(count, dtype=np.uint64)) or not np.isfinite(vectors).all():
        raise bad("labels or vectors are invalid")
    pos, per_level = level0_end, max_m * 4 + 4
    for _ in range(count):
        if pos + 4 > len(data):
            raise bad("truncated upper-level links")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size % per_level or size // per_level > max_level or pos + size > len(data):
            raise bad("an upper-level link list has an impossible size")
        if size:
            block = np.frombuffer(data, np.uint32, size // 4, pos).reshape(-1, max_m + 1)
            counts = block[:, 0] & 0xFFFF
            inner = np.arange(max_m)[None, :] < counts[:, None]
            if (counts > max_m).any() or (block[:, 1:][inner] >= count).any():
                raise bad("an upper-level neighbour list points outside the index")
            pos += size
    if pos != len(data):
        raise bad("trailing bytes after the last link list")

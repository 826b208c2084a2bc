"""Choosing which neighbours condition a generation.

Training and sampling must see the same kind of neighbour list (method.md): the query itself
never appears, and k neighbours are drawn from the nearest `window`, keeping rank order.
"""

from __future__ import annotations

import numpy as np


def draw_neighbours(candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k of the nearest candidates (ids, nearest first), drawn without replacement, in rank order."""
    if len(candidates) < k:
        raise ValueError(f"{len(candidates)} candidate neighbours, {k} needed")
    picked = np.sort(rng.permutation(len(candidates))[:k])
    return candidates[picked]

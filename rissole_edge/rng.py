"""Every random draw of a generation, keyed by (seed, image index, purpose[, step]).

Keying each draw separately (instead of one stream consumed in order) is what makes image i
of a batch identical to the same image generated alone, whatever the batching, block order or
thread count. The toolchain's torch sampler uses these same functions, so a parity test can
compare the two on identical noise.
"""

from __future__ import annotations

import random
import sys
import types

import numpy as np


def _import_numpy_random() -> None:
    """Import numpy.random without OpenSSL. Its bit_generator imports one function from
    `secrets`, randbits (fresh entropy, which keyed draws never use), and `secrets` imports
    hmac, hashlib and OpenSSL's libcrypto: 3.8 MB of RSS, measured (benchmarks/memory.py).
    While numpy.random is imported, `secrets` is a stand-in holding that one function, the
    same `SystemRandom().getrandbits` that `secrets.randbits` is; it is removed at once, so a
    later `import secrets` gets the real module. Nothing changes when numpy.random or secrets
    is loaded already, or when a numpy wants more of `secrets` (then it is imported plainly)."""
    if "numpy.random" in sys.modules or "secrets" in sys.modules:
        return
    stand_in = types.ModuleType("secrets")
    stand_in.randbits = random.SystemRandom().getrandbits      # type: ignore[attr-defined]
    sys.modules["secrets"] = stand_in
    try:
        import numpy.random  # noqa: F401
    except ImportError:
        pass
    finally:
        if sys.modules.get("secrets") is stand_in:
            del sys.modules["secrets"]
    import numpy.random  # noqa: F401,F811


_import_numpy_random()
_INITIAL, _NEIGHBOURS, _QUERY, _STEP = range(4)


def initial_noise(seed: int, image: int, shape: tuple[int, ...]) -> np.ndarray:
    """x_T of every block of one image, (P, C, s, s) float32."""
    return np.random.default_rng([seed, image, _INITIAL]).standard_normal(shape).astype(np.float32)


def step_noise(seed: int, image: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
    """The fresh noise a stochastic sampler adds at `step` to one image's blocks."""
    return np.random.default_rng([seed, image, _STEP, step]).standard_normal(shape).astype(np.float32)


def neighbour_rng(seed: int, image: int) -> np.random.Generator:
    """Draws which k of the nearest `window` neighbours condition an image."""
    return np.random.default_rng([seed, image, _NEIGHBOURS])


def query_rng(seed: int, image: int) -> np.random.Generator:
    """Draws the database entry an image is generated from, when the user names none."""
    return np.random.default_rng([seed, image, _QUERY])

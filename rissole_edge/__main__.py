"""`python -m rissole_edge` (and `torchrun -m rissole_edge train ...`) runs the CLI."""

from .cli import main

main()

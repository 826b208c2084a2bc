"""The `rissole-edge` command line.

Runtime commands import only the runtime; toolchain commands (train, ...) import torch lazily
inside the command, so a runtime-only install starts fast and says how to get the toolchain.
Every user error ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import RissoleError, ToolchainMissing

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="On-device image generation with a retrieval-guided block diffusion model.")


def _toolchain():
    """Import the toolchain, or explain in one line how to install it."""
    try:
        import torch  # noqa: F401
        import rissole_export
    except ImportError as e:
        raise ToolchainMissing(f"this command needs the toolchain ({e.name} is missing): "
                               "pip install 'rissole-edge[export]'") from None
    return rissole_export


@app.callback()
def _root() -> None:
    """On-device image generation with a retrieval-guided block diffusion model."""


@app.command()
def train(
    data: str = typer.Argument(..., help="An image folder (sub-folders = classes), 'fashion-mnist' or 'twemoji'."),
    out: Path = typer.Option(..., "--out", help="Run directory: config, checkpoints, database, metrics, samples."),
    preset: Optional[str] = typer.Option(None, help="tiny | small | base (default small; on --resume, the run's own)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON overrides of the preset."),
    stage: str = typer.Option("all", help="autoencoder | database | denoiser | all."),
    max_minutes: Optional[float] = typer.Option(None, help="Checkpoint and stop after this many minutes."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train a run: VQ autoencoder -> neighbour database -> block denoiser (toolchain extra)."""
    _toolchain()
    from rissole_export.train import train as run_training

    summary = run_training(data, out, preset, config_file, stage, max_minutes, resume)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            typer.echo(f"{key}: {value}")
    if summary.get("interrupted"):
        raise typer.Exit(130)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2 (click
    already exits with 2 on usage errors)."""
    try:
        app()
    except RissoleError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)

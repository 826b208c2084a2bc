"""Line charts for benchmark results, drawn with matplotlib (the `bench` extra).

matplotlib is imported inside `plot`, so that benchmark child processes which never plot do
not pay for it in start-up time or peak RSS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot(path: Path, title: str, xs: Sequence[float], series: dict[str, Sequence[float | None]],
         xlabel: str, ylabel: str) -> None:
    """One PNG line chart: a line with markers per series over `xs` (a None value is a gap,
    e.g. a configuration that failed); the y axis starts at 0 so that ratios read true."""
    import matplotlib

    matplotlib.use("Agg")                 # no display on a benchmark machine
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for name, values in series.items():
            ax.plot(xs, [float("nan") if v is None else v for v in values], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)

"""What every evaluation command shares in its output: JSON-safe numbers, the one JSON document, PNG figures."""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge.console import emit_json, say
from edge.errors import InputError


def json_number(value: float, digits: int = 6) -> float | None:
    """Rounded float, None for ±inf (JSON has no infinity)."""
    return round(float(value), digits) if math.isfinite(value) else None


def emit(args, document: dict) -> None:
    """The command's report on stdout when --json was given."""
    if args.json:
        emit_json(document)


def percent(value: float | None) -> str:
    """A rate as a fixed-width percentage for stderr tables; n/a for None."""
    return "  n/a " if value is None else f"{100 * value:5.2f}%"


def note_plot(report: dict, path: Path) -> None:
    """Name the PNG just written, in the report and on stderr."""
    report["plot"] = str(path)
    say(f"plot written to {path}")


def check_writable_target(path: Path | None) -> None:
    """Fail before minutes of embedding, not after."""
    if path is not None and not os.access(path.parent, os.W_OK):
        raise InputError(f"{path}: folder {path.parent} does not exist or is not writable")


@contextmanager
def png_figure(path: Path, **subplots) -> Iterator[tuple]:
    """(figure, axes) of matplotlib's headless backend, saved to `path` as a PNG when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(**subplots)
    try:
        yield figure, axes
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)
    finally:
        plt.close(figure)

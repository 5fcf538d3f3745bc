"""Figures drawn straight on matplotlib's Agg canvas, written atomically as PNG.

pyplot is never imported: its global figure registry and backend selection cost a
quarter of a second per process and are of no use to a program that only writes files.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from common.files import write_bytes_atomic


def new_figure(**kwargs: Any):
    """A ``matplotlib.figure.Figure`` laid out by the constrained layout engine."""
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def write_png(figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    write_bytes_atomic(path, buffer.getvalue())

"""Figures drawn straight on matplotlib's Agg canvas, written atomically as PNG.

pyplot is never imported: its global figure registry and backend selection cost a
quarter of a second per process and are of no use to a program that only writes files.
Importing matplotlib itself still takes 0.3-0.5 s; ``preload`` does it on a background
thread while a run trains, so that the plot at the end does not wait for it.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from common.files import write_bytes_atomic


def _import_matplotlib() -> None:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # noqa: BLE001 - new_figure reports a broken install where it matters
        pass


def preload() -> threading.Thread:
    """Start importing matplotlib in the background (Python's import lock makes a later
    import wait for this one rather than run twice)."""
    thread = threading.Thread(target=_import_matplotlib, name="preload-matplotlib", daemon=True)
    thread.start()
    return thread


def new_figure(**kwargs: Any):
    """A ``matplotlib.figure.Figure`` laid out by the constrained layout engine."""
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def write_png(figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    write_bytes_atomic(path, buffer.getvalue())

"""Figures as PNG files whose bytes depend only on the data: one matplotlib set-up for every plot.

No pyplot (no global figure state, no GUI backend): a `Figure` on the Agg canvas, the DejaVu Sans that
ships inside matplotlib, a fixed dpi, and no "Software" text chunk in the PNG. Same data + same
matplotlib → same bytes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

DPI = 100
STYLE = {
    "font.family": "DejaVu Sans",    # bundled with matplotlib: the same glyphs on every machine
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.framealpha": 0.9,
    "svg.hashsalt": "pas",
}
# colours shared by the figures: real / synthetic images, knees, the stop
REAL, SYNTHETIC, KNEE, STOP = "#1f77b4", "#ff7f0e", "#d62728", "#000000"


@contextlib.contextmanager
def figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **subplot_kw) -> Iterator[tuple]:
    """(fig, axes) of a `width` × `height` inch figure with the shared style; axes squeezed as
    `plt.subplots` does. Save it with `save_png` inside the `with` block."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=True, **subplot_kw)
        yield fig, axes


def save_png(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path

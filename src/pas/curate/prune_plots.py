"""PNG figures of the prune stage.

- `plot_peel` (matplotlib, `pas.plots`): one panel per metric: mean score per front against images
  removed, the binned curve kneedle saw when `prune.knee_bins` > 0, its knee and the stop, with a
  legend, ticks and axis labels.
- `sample_grid` (matplotlib, `pas.plots`): rows of images from "Pareto n" fronts (paper Figures 10 and
  13), each row titled with its front, each image captioned with its scores as the report shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image


def plot_peel(curve_x: np.ndarray, curves: Mapping[str, np.ndarray], binned_x: np.ndarray,
              binned: Mapping[str, np.ndarray], knees: Mapping[str, tuple[float | None, float | None]],
              stop_x: float | None, path: str | Path, title: str = "") -> Path:
    """Peel curves with knee markers, one panel per metric in `curves` (same keys in `binned`).

    `knees[m] = (x, y)` or (None, None); `stop_x` draws the stop line (None: none). The binned curve
    is drawn only where it differs from the per-front one (`knee_bins: 0` makes them equal).
    """
    from pas.plots import KNEE, STOP, figure, save_png

    names = list(curves) or ["(no metric)"]
    x = np.asarray(curve_x, dtype=float)
    bx = np.asarray(binned_x, dtype=float)
    with figure(4.2 * len(names), 3.6, 1, len(names), sharex=True) as (fig, axes):
        axes = np.atleast_1d(axes)
        for ax, m in zip(axes, names):
            y = np.asarray(curves.get(m, []), dtype=float)
            by = np.asarray(binned.get(m, []), dtype=float)
            same = len(bx) == len(x) and np.array_equal(bx, x) and np.array_equal(by, y)
            ax.plot(x, y, color="#4c72b0", lw=1.2, marker="o", ms=2.5,
                    label="mean score per front" + (" (kneedle's curve)" if same else ""))
            if not same and len(bx):
                ax.plot(bx, by, color="#1b2f6b", lw=2.0, label="binned (kneedle's curve)")
            kx, ky = knees.get(m, (None, None))
            if kx is not None:
                ax.axvline(kx, color=KNEE, lw=1.0, ls=":")
                ax.plot([kx], [ky], "o", mfc="none", mec=KNEE, mew=2, ms=9, label=f"knee: {int(kx):,} removed")
            if stop_x is not None:
                ax.axvline(stop_x, color=STOP, lw=1.2, ls="--", label=f"stop: {int(stop_x):,} removed")
            ax.set_title(m if kx is not None or m not in knees else f"{m} (no knee)")
            ax.set_xlabel("images removed (cumulative, worst fronts first)")
            ax.set_ylabel("mean score of the front")
            if len(x) or kx is not None or stop_x is not None:
                ax.legend(loc="best")
        if title:
            fig.suptitle(title)
        return save_png(fig, path)


def _thumb(data: bytes, size: int) -> Image.Image:
    from pas.io.shards import decode_image

    im = decode_image(data)
    scale = size / max(im.width, im.height)          # fit the cell, up or down
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def score_caption(ood_b: float, ood_bprime: float, ood_blur_delta: float) -> str:
    """An image's scores in the report's words (pas.report's Pareto rows)."""
    return f"B {ood_b:.3f} · B′ {ood_bprime:.3f}\nΔblur {ood_blur_delta:+.4f}"


def sample_grid(rows: Sequence[tuple[str, Sequence[tuple[bytes, str]]]], path: str | Path, thumb: int = 128) -> Path:
    """One row of thumbnails per (front label, [(encoded image, caption)]), the label above the row and
    each caption under its image; no rows -> a note. Same images and text -> same PNG bytes."""
    from pas.plots import figure, save_png

    cols = max([len(imgs) for _, imgs in rows] + [1])
    nrows = max(len(rows), 1)
    with figure(1.45 * cols + 0.2, 2.05 * nrows, nrows, cols) as (fig, axes):
        axes = np.asarray(axes).reshape(nrows, cols)   # figure() squeezes as plt.subplots does
        for ax in axes.flat:
            ax.set_axis_off()
        if not rows:
            axes[0, 0].text(0.5, 0.5, "no fronts to show", ha="center", va="center",
                            transform=axes[0, 0].transAxes)
        for r, (label, imgs) in enumerate(rows):
            # the row's title hangs off its first cell: the other cells have no title to collide with
            axes[r, 0].set_title(label, loc="left", fontweight="bold", fontsize=9)
            for c, (data, caption) in enumerate(imgs[:cols]):
                ax = axes[r, c]
                ax.set_axis_on()
                ax.imshow(np.asarray(_thumb(data, thumb)), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                ax.set_xlabel(caption, fontsize=7, linespacing=1.2)
        return save_png(fig, path)

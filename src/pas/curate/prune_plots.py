"""PNG figures of the prune stage, drawn with Pillow (matplotlib is not a dependency).

- `plot_peel`: one panel per metric: mean score per front against images removed (light), the binned
  curve kneedle saw (dark), its knee (red) and the stop (black dashed).
- `sample_grid`: rows of images from "Pareto n" fronts (paper Figures 10 and 13).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_W, _H, _PAD = 380, 300, 46       # panel size and margin (px)


def _font():
    return ImageFont.load_default()


def _dashed_vline(d: ImageDraw.ImageDraw, x: float, y0: float, y1: float, fill, dash: int = 5) -> None:
    y = y0
    while y < y1:
        d.line([(x, y), (x, min(y + dash, y1))], fill=fill, width=2)
        y += 2 * dash


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def plot_peel(curve_x: np.ndarray, curves: Mapping[str, np.ndarray], binned_x: np.ndarray,
              binned: Mapping[str, np.ndarray], knees: Mapping[str, tuple[float | None, float | None]],
              stop_x: float | None, path: str | Path, title: str = "") -> Path:
    """Peel curves with knee markers, one panel per metric in `curves` (same keys in `binned`).

    `knees[m] = (x, y)` or (None, None); `stop_x` draws the stop line (None: none).
    """
    names = list(curves)
    img = Image.new("RGB", (_W * max(len(names), 1), _H + 24), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    if title:
        d.text((8, 4), title, fill="black", font=font)
    x_all = np.asarray(curve_x, dtype=float)
    xmax = float(x_all.max()) if len(x_all) else 1.0
    for p, m in enumerate(names):
        ox, oy = p * _W, 24
        left, top, right, bottom = ox + _PAD, oy + 22, ox + _W - 12, oy + _H - _PAD + 8
        d.rectangle([left, top, right, bottom], outline="black")
        ys = [np.asarray(curves[m], dtype=float), np.asarray(binned[m], dtype=float)]
        yall = np.concatenate([y for y in ys if len(y)]) if any(len(y) for y in ys) else np.zeros(1)
        ymin, ymax = float(yall.min()), float(yall.max())
        if ymax == ymin:
            ymin, ymax = ymin - 0.5, ymax + 0.5

        def px(x):
            return left + (right - left) * (x / xmax if xmax else 0.0)

        def py(y):
            return bottom - (bottom - top) * (y - ymin) / (ymax - ymin)

        for xs, y, colour, w in ((x_all, ys[0], (170, 190, 225), 1),
                                 (np.asarray(binned_x, float), ys[1], (20, 60, 160), 2)):
            pts = [(px(a), py(b)) for a, b in zip(xs, y)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=w)
            elif pts:
                d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        if stop_x is not None and xmax:
            _dashed_vline(d, px(stop_x), top, bottom, "black")
        kx, ky = knees.get(m, (None, None))
        label = f"{m}: no knee"
        if kx is not None:
            cx, cy = px(kx), py(ky)
            d.line([(cx, top), (cx, bottom)], fill=(200, 30, 30), width=1)
            d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], outline=(200, 30, 30), width=2)
            label = f"{m}: knee at {int(kx):,} removed"
        d.text((left, oy + 6), label, fill="black", font=font)
        d.text((left, bottom + 4), "0", fill="black", font=font)
        d.text((right - 40, bottom + 4), _fmt(xmax), fill="black", font=font)
        d.text((left + 60, bottom + 18), "images removed (cumulative)", fill="black", font=font)
        d.text((ox + 2, top), _fmt(ymax), fill="black", font=font)
        d.text((ox + 2, bottom - 10), _fmt(ymin), fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)
    return path


def _thumb(data: bytes, size: int) -> Image.Image:
    from pas.io.shards import decode_image

    im = decode_image(data)
    scale = size / max(im.width, im.height)          # fit the cell, up or down
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def sample_grid(rows: Sequence[tuple[str, Sequence[bytes]]], path: str | Path, thumb: int = 96,
                cols: int | None = None) -> Path:
    """One labelled row of thumbnails per (label, [encoded images]); an empty list -> a note."""
    font = _font()
    cols = cols or max([len(imgs) for _, imgs in rows] + [1])
    label_h = 16
    height = max(len(rows), 1) * (thumb + label_h + 6) + 6
    img = Image.new("RGB", (cols * (thumb + 4) + 8, height), "white")
    d = ImageDraw.Draw(img)
    if not rows:
        d.text((6, 6), "no fronts to show", fill="black", font=font)
    y = 4
    for label, imgs in rows:
        d.text((6, y), label, fill="black", font=font)
        y += label_h
        for i, data in enumerate(imgs):
            img.paste(_thumb(data, thumb), (6 + i * (thumb + 4), y))
        y += thumb + 6
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)
    return path

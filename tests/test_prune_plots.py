"""removed_samples.png (pas.curate.prune_plots.sample_grid): matplotlib through pas.plots, same bytes twice."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pas.curate.prune_plots import sample_grid, score_caption

GREEN, MAGENTA = (0, 200, 0), (200, 0, 200)


def _png(rgb, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(path, rgb) -> int:
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(a - rgb).sum(-1) < 30).sum())


def test_score_caption_is_the_reports():
    assert score_caption(ood_b=0.5, ood_bprime=0.25, ood_blur_delta=-0.01) == "B 0.500 · B′ 0.250\nΔblur -0.0100"


def test_sample_grid_same_bytes_twice_with_labels_and_thumbnails(tmp_path):
    rows = [("Pareto 1 (3 images, removed)", [(_png(GREEN), score_caption(0.9, 0.8, 0.1))] * 3),
            ("Pareto 10 (5 images, kept)", [(_png(MAGENTA, (30, 60)), score_caption(0.2, 0.1, 0.0))])]
    for name in ("a.png", "b.png"):
        sample_grid(rows, tmp_path / name)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and "Software" not in im.info
        assert im.width >= 3 * 128 and im.height >= 2 * 150     # three columns, two rows of cells
        dark = (np.asarray(im.convert("L")) < 80).sum()
    assert _pixels(tmp_path / "a.png", GREEN) > 3 * 50 * 50       # each thumbnail fills ~128 px cells
    assert _pixels(tmp_path / "a.png", MAGENTA) > 50 * 50
    assert dark > 2000                                            # titles and captions were drawn


def test_sample_grid_without_rows_says_so(tmp_path):
    path = sample_grid([], tmp_path / "empty.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and (np.asarray(im.convert("L")) < 80).sum() > 100   # the note's text

"""What several benchmark scripts share. Import it as `from _common import ...`: a script's own folder
is first on sys.path (the convention of `from pareto import make` in knee_stop.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:          # stdlib only at import: benchmarks that measure memory or import time import this
    import numpy as np


def emit(result: str | dict, out: str | Path | None = None, *, append: bool = False, indent: int | None = 1) -> None:
    """A benchmark's output tail: print `result` and, given `out`, save it there — a markdown table (str)
    as it is, a dict as JSON (`indent`; None: one line) ending in a newline. `append` adds to `out` (the
    RESULTS-*.md tables and the *.jsonl logs collect runs); otherwise `out` is replaced."""
    text = result if isinstance(result, str) else json.dumps(result, indent=indent)
    print(text)
    if out:
        with open(out, "a" if append else "w") as f:
            f.write(text if isinstance(result, str) else text + "\n")


def copy_augment(size: int, rng: np.random.Generator, min_area: float = 0.25):
    """One SSCD-style copy edit as a function PIL → PIL (size × size), drawn from `rng`: the planted
    copies of the calibration benchmark and tests (training uses the batched
    `pas.models.sscd_train.augment_batch`)."""
    import io

    from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

    def edit(img: Image.Image) -> Image.Image:
        w, h = img.size
        area = rng.uniform(min_area, 1.0) * w * h
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = int(min(w, max(8, round(math.sqrt(area * ratio)))))
        ch = int(min(h, max(8, round(math.sqrt(area / ratio)))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        if rng.random() < 0.8:
            for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                img = enh(img).enhance(float(rng.uniform(0.6, 1.4)))
        if rng.random() < 0.2:
            img = ImageOps.grayscale(img).convert("RGB")
        if rng.random() < 0.3:
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, 1.5))))
        if rng.random() < 0.3:                       # overlay: a caption or a patch, as edited copies carry
            d = ImageDraw.Draw(img)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                text = "".join(chr(int(c)) for c in rng.integers(65, 91, int(rng.integers(3, 9))))
                d.text((int(rng.integers(0, size // 2)), int(rng.integers(0, size - 12))), text, fill=colour)
            else:
                s = int(rng.integers(size // 8, size // 3))
                px, py = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
                d.rectangle((px, py, px + s, py + s), fill=colour)
        if rng.random() < 0.5:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=int(rng.integers(20, 96)))
            buf.seek(0)
            img = Image.open(buf).convert("RGB")
        return img

    return edit

"""Safe decoding of untrusted image files.

Real collections contain decompression bombs (openclipart-png has a 623-Mpix PNG), transparency in
every flavour (RGBA, LA, palette with tRNS), truncated files and photos stored sideways with an EXIF
orientation tag. Pillow's own bomb guard stays on (`open_image`); we read the header size before
decoding, let Pillow downscale JPEGs while decoding (`draft`), turn images upright, composite anything
transparent on white, and turn every failure into a `BadImage` with a short reason the caller counts.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from PIL import Image, ImageOps


def error_text(e: BaseException) -> str:
    """`str(e)` without object addresses: Pillow names an in-memory file `<_io.BytesIO object at
    0x7f…>`, which would make the skipped rows' bytes differ from run to run."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(e))


class BadImage(Exception):
    """An image that cannot be used. `reason` is a short label for metrics (e.g. "too_large")."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def to_rgb_on_white(img: Image.Image) -> Image.Image:
    """RGB view of any mode; transparent pixels become white (not black, as a plain convert gives)."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bit instead of clipping
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


ORIENTATION = 0x0112   # EXIF tag: how the stored pixels must be turned to be upright (1 = as stored)


def upright(img: Image.Image) -> tuple[Image.Image, int]:
    """`img` turned as its EXIF (or XMP) orientation says, and that orientation (1 = none applied).

    Cameras store the sensor's pixels and a tag saying how to turn them; ignoring it stores photos
    sideways. Call after `load()` (a PNG's eXIf chunk may follow its pixel data). Unreadable EXIF
    leaves the pixels as stored."""
    try:
        o = int(img.getexif().get(ORIENTATION, 1))
        if 2 <= o <= 8:
            return ImageOps.exif_transpose(img), o
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost a good image
        pass
    return img, 1


def open_image(fp, max_pixels: int, name: str) -> Image.Image:
    """`Image.open` (lazy: no pixel decoded yet) under Pillow's own decompression-bomb guard, raised to
    `max_pixels` when that is above it, never turned off: past its limit Pillow warns and past twice
    it refuses, and both are BadImage("too_large"). A tighter `max_pixels` is checked from the header.
    Not an image: BadImage("unreadable"). `name` is what error details call the file."""
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", f"{name}: {error_text(e)}") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for non-images
        raise BadImage("unreadable", f"{name}: {error_text(e)}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise BadImage("too_large", f"{name}: {w}x{h} = {w * h / 1e6:.0f} Mpix > {max_pixels / 1e6:.0f}")
    return img


def load_rgb(path: str | Path, max_pixels: int = 50_000_000, max_side: int | None = 512,
             min_side: int = 8) -> Image.Image:
    """Decode `path` into an RGB image whose longer side is ≤ `max_side`.

    Raises BadImage("too_large") when the header says more than `max_pixels` (checked before any
    pixel is decoded), "too_small", "unreadable" (not an image / unknown format) or "corrupt"
    (truncated or broken data). An image with an EXIF orientation is turned upright and carries the
    original orientation (2-8) in `info["exif_orientation"]`.
    """
    img = open_image(path, max_pixels, str(path))
    with img:
        w, h = img.size
        if min(w, h) < min_side:
            raise BadImage("too_small", f"{path}: {w}x{h}")
        try:
            if max_side and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))  # decode at reduced scale: cheap
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
            turned, orientation = upright(img)
            out = to_rgb_on_white(turned)
        except Exception as e:  # noqa: BLE001
            raise BadImage("corrupt", f"{path}: {error_text(e)}") from None
    if max_side and max(out.size) > max_side:
        out.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    if orientation != 1:
        out.info["exif_orientation"] = orientation
    return out

"""pas.curate.textblur: the shipped DBNet finds rendered text; blurring touches only the boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pas.curate.textblur import TextDetector, blur_regions, region_mask

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def _font(size):
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default(size=size)


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("rapidocr_onnxruntime")
    return TextDetector(limit_side_len=320)


def _text_image(size=(320, 240), xy=(20, 90), text="PIZZA 42", font_size=36):
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text(xy, text, fill="black", font=_font(font_size))
    return img, draw.textbbox(xy, text, font=_font(font_size))


def _covers(boxes, bbox, tol=4):
    """Some box's axis-aligned extent contains the text's bounding box (± tol px)."""
    for b in boxes:
        x0, y0 = b.min(axis=0)
        x1, y1 = b.max(axis=0)
        if x0 <= bbox[0] + tol and y0 <= bbox[1] + tol and x1 >= bbox[2] - tol and y1 >= bbox[3] - tol:
            return True
    return False


def test_detects_rendered_text(detector):
    img, bbox = _text_image()
    boxes = detector.detect(img)
    assert boxes.shape[1:] == (4, 2) and len(boxes) >= 1
    assert _covers(boxes, bbox)


def test_detects_text_in_large_image_in_original_coordinates(detector):
    # 1280 px wide: the detector runs at 320 px, boxes come back in the input's pixel coordinates
    img, bbox = _text_image(size=(1280, 960), xy=(100, 400), font_size=120)
    boxes = detector.detect(img)
    assert _covers(boxes, bbox, tol=16)
    assert boxes[..., 0].max() <= 1279 and boxes[..., 1].max() <= 959


def test_no_text_no_boxes(detector):
    y, x = np.mgrid[0:200, 0:300]
    gradient = Image.fromarray(np.stack([x * 255 // 300, y * 255 // 200, 128 + 0 * x], -1).astype(np.uint8))
    assert detector.detect(gradient).shape == (0, 4, 2)
    assert detector.detect(Image.new("RGB", (64, 64), "white")).shape == (0, 4, 2)
    assert detector.detect(Image.new("RGB", (10, 10), "white")).shape == (0, 4, 2)  # rounds to 0 px


@pytest.mark.parametrize("kind", ["gaussian", "fill"])
def test_blur_changes_only_pixels_inside_boxes(kind):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    boxes = np.array([[[10, 10], [70, 10], [70, 40], [10, 40]],
                      [[90, 60], [150, 70], [145, 100], [85, 90]]], np.float32)   # one rotated
    out = blur_regions(img, boxes, kind=kind)
    inside = np.asarray(region_mask(img.size, boxes)) > 0
    changed = np.any(np.asarray(out) != np.asarray(img), axis=2)
    assert not changed[~inside].any()                 # nothing outside the boxes moved
    assert changed[inside].mean() > 0.9               # noise inside is smoothed / filled
    if kind == "fill":                                # one colour per box: the box's mean colour
        m0 = np.asarray(region_mask(img.size, boxes[:1])) > 0
        px = np.asarray(out)[m0]
        assert (px == px[0]).all()
        np.testing.assert_allclose(px[0], np.asarray(img)[m0].mean(axis=0), atol=0.51)


def test_blur_without_boxes_is_identity_and_rejects_unknown_kind():
    img = Image.new("RGB", (32, 32), (10, 20, 30))
    assert np.array_equal(np.asarray(blur_regions(img, np.zeros((0, 4, 2)))), np.asarray(img))
    with pytest.raises(ValueError, match="blur kind"):
        blur_regions(img, np.zeros((0, 4, 2)), kind="pixelate")


def test_blur_makes_detected_text_undetectable(detector):
    img, _ = _text_image()
    boxes = detector.detect(img)
    blurred = blur_regions(img, boxes)
    assert len(detector.detect(blurred)) == 0

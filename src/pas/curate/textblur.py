"""Text regions: detect them (DBNet, detection only) and blur or fill them.

Paper §3.3: "I' is a variant of I with text regions blurred. Particularly, a text-detection algorithm is
used to find the text present in every image. This approach aims to reduce biases in the CLIP score
introduced by the textual content in the images". The paper used FAST (via T-MARS); offline we use the
PP-OCRv4 DBNet detector that `rapidocr-onnxruntime` ships as an ONNX file, and run only that model:
the package's own pre-/post-processing classes (`DetPreProcess`, `DBPostProcess`) around one
onnxruntime session, with the longer side limited to `limit_side_len` (320 px). rapidocr's `RapidOCR`
front door would also load the recogniser and, with `limit_type="max"`, silently ignores the limit
(it picks 960/1500/2000), while its default `"min"` upscales small images to 736 px: both slow.

Boxes are quadrilaterals `(K, 4, 2)` in pixel coordinates of the input image (x, y), clockwise from
top-left. Blurring changes only the pixels inside the boxes (a polygon mask composites the result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageStat

from pas.models.det_trunk import default_det_model

BLUR_KINDS = ("gaussian", "fill")


@dataclass
class TextDetector:
    """DBNet text detector (detection only). Call `detect(pil)` → boxes `(K, 4, 2)` float32.

    limit_side_len: the longer side is scaled down to at most this many pixels (never up), then both
    sides are rounded to multiples of 32 as the network needs. thresh/box_thresh/unclip_ratio are
    DBNet's binarisation threshold, minimum mean box score and polygon expansion (rapidocr defaults).
    """

    limit_side_len: int = 320
    thresh: float = 0.3
    box_thresh: float = 0.5
    unclip_ratio: float = 1.6
    min_side: int = 4              # boxes with a side ≤ 3 px are dropped (as rapidocr does)
    threads: int = 0               # onnxruntime intra-op threads; 0 = its default
    model_path: str | None = None
    _session: Any = field(default=None, init=False, repr=False)
    _pre: Any = field(default=None, init=False, repr=False)
    _post: Any = field(default=None, init=False, repr=False)

    def _load(self) -> None:
        import onnxruntime as ort
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess, DetPreProcess

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads > 0:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        path = str(self.model_path or default_det_model())
        self._session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self._pre = DetPreProcess(self.limit_side_len, "max", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
        self._post = DBPostProcess(thresh=self.thresh, box_thresh=self.box_thresh, max_candidates=1000,
                                   unclip_ratio=self.unclip_ratio, score_mode="fast", use_dilation=True)

    def detect(self, img: Image.Image) -> np.ndarray:
        """Text boxes of an image: float32 `(K, 4, 2)` of (x, y) corners; `(0, 4, 2)` when none."""
        if self._session is None:
            self._load()
        bgr = np.asarray(img.convert("RGB"))[:, :, ::-1]   # the detector was trained on cv2 (BGR) input
        x = self._pre(np.ascontiguousarray(bgr))
        if x is None:                                      # too small to round to 32 px
            return np.zeros((0, 4, 2), np.float32)
        (pred,) = self._session.run(None, {self._session.get_inputs()[0].name: x})
        boxes, _scores = self._post(pred, bgr.shape[:2])
        h, w = bgr.shape[:2]
        keep = []
        for box in np.asarray(boxes, np.float32).reshape(-1, 4, 2):
            box[:, 0] = np.clip(box[:, 0], 0, w - 1)
            box[:, 1] = np.clip(box[:, 1], 0, h - 1)
            side_w = np.linalg.norm(box[0] - box[1])
            side_h = np.linalg.norm(box[0] - box[3])
            if side_w >= self.min_side and side_h >= self.min_side:
                keep.append(box)
        return np.stack(keep).astype(np.float32) if keep else np.zeros((0, 4, 2), np.float32)


def region_mask(size: tuple[int, int], boxes: np.ndarray) -> Image.Image:
    """Mode-"L" mask of `size` (w, h): 255 inside any box polygon, 0 elsewhere."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for box in np.asarray(boxes, np.float32).reshape(-1, 4, 2):
        draw.polygon([(float(x), float(y)) for x, y in box], fill=255)
    return mask


def _short_side(box: np.ndarray) -> float:
    return float(min(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[0] - box[3])))


def blur_regions(img: Image.Image, boxes: np.ndarray, kind: str = "gaussian",
                 radius: float = 0.0) -> Image.Image:
    """I' of the paper: `img` with the text boxes blurred ("gaussian") or filled with the mean colour
    of the box ("fill", as T-MARS inpaints text). Pixels outside the boxes are left untouched.

    radius: Gaussian radius in pixels; 0 = per box, half its short side (≈ the text height, so the
    glyphs are unreadable whatever the image size).
    """
    if kind not in BLUR_KINDS:
        raise ValueError(f"blur kind {kind!r} must be one of {BLUR_KINDS}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4, 2)
    img = img.convert("RGB")
    out = img.copy()
    w, h = img.size
    for box in boxes:
        mask = region_mask(img.size, box[None])
        bbox = mask.getbbox()
        if bbox is None:
            continue
        if kind == "fill":
            mean = tuple(int(round(v)) for v in ImageStat.Stat(img, mask).mean)
            out.paste(Image.new("RGB", img.size, mean), (0, 0), mask)
            continue
        r = radius if radius > 0 else max(1.0, 0.5 * _short_side(box))
        pad = int(np.ceil(3 * r))                          # blur a padded crop, not the whole image
        x0, y0 = max(0, bbox[0] - pad), max(0, bbox[1] - pad)
        x1, y1 = min(w, bbox[2] + pad), min(h, bbox[3] + pad)
        crop = img.crop((x0, y0, x1, y1)).filter(ImageFilter.GaussianBlur(r))
        out.paste(crop, (x0, y0), mask.crop((x0, y0, x1, y1)))
    return out

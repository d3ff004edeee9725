"""Timings of the `ood` stage's parts on this machine (benchmark, not a test).

    PYTHONPATH=src python benchmarks/ood_timing.py [--n 60] [--clip models/clip]

1. text detection (DBNet, detection only) s/img on openclipart food PNGs, at limit 320 (ours) and
   with rapidocr's own front door at its default (736 px, "min": small images are upscaled);
2. CLIP image encoding s/img (the tiny seeded CLIP unless --clip names a folder);
3. the score itself: `ood_scores` with |B| = 5000 concepts, D = 768 (ViT-L/14) per image, in chunks.
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--clip", default=None)
    ap.add_argument("--images", default="/usr/share/openclipart/png/food")
    args = ap.parse_args()

    from pas.curate.ood import ood_scores
    from pas.curate.textblur import TextDetector, blur_regions
    from pas.data.images import load_rgb
    from pas.models.clip import build_tiny_clip, load_clip

    from pas.data.images import BadImage

    imgs = []
    for f in sorted(glob.glob(f"{args.images}/**/*.png", recursive=True)):
        try:
            imgs.append(load_rgb(f, max_side=512))
        except BadImage:
            continue
        if len(imgs) == args.n:
            break
    res: dict = {"n_images": len(imgs), "mean_size": np.mean([im.size for im in imgs], axis=0).tolist()}

    det = TextDetector(limit_side_len=320)
    det.detect(imgs[0])
    t = time.perf_counter()
    boxes = [det.detect(im) for im in imgs]
    res["detect_s_per_img_320"] = (time.perf_counter() - t) / len(imgs)
    res["frac_with_text"] = float(np.mean([len(b) > 0 for b in boxes]))
    t = time.perf_counter()
    for im, b in zip(imgs, boxes):
        blur_regions(im, b)
    res["blur_s_per_img"] = (time.perf_counter() - t) / len(imgs)

    from rapidocr_onnxruntime import RapidOCR

    eng = RapidOCR()
    bgr = [np.asarray(im)[:, :, ::-1].copy() for im in imgs[:20]]
    eng.text_det(bgr[0])
    t = time.perf_counter()
    for x in bgr:
        eng.text_det(x)
    res["detect_s_per_img_rapidocr_default"] = (time.perf_counter() - t) / len(bgr)

    clip_dir = args.clip or build_tiny_clip(tempfile.mkdtemp() + "/clip")
    clip = load_clip(clip_dir)
    clip.encode_images(imgs[:4])
    t = time.perf_counter()
    clip.encode_images(imgs, batch_size=64)
    res["clip_s_per_img"] = (time.perf_counter() - t) / len(imgs)
    res["clip"] = "tiny (64 px, width 128)" if args.clip is None else str(args.clip)

    rng = np.random.default_rng(0)

    def unit(n, d):
        x = rng.normal(size=(n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    f, gy, gn = unit(2048, 768), unit(5000, 768), unit(5000, 768)
    t = time.perf_counter()
    ood_scores(f, gy, gn, concept_chunk=1024, image_chunk=512)
    dt = time.perf_counter() - t
    res["score_s_per_img_5000_concepts_d768"] = dt / len(f)
    res["score_hours_per_1M_images_5000_concepts"] = dt / len(f) * 1e6 / 3600
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

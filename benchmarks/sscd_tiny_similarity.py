"""Measure what the tiny random-init SSCD does on real images: cosine distributions of unrelated
clipart pairs vs copies (exact, JPEG re-encodes, resizes), of tiny-SD generated images, and how many
images dedup would remove at several λ_dup. Chooses honest thresholds for the offline smoke profile.

    python benchmarks/sscd_tiny_similarity.py [--category food] [--n-generated 24]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

CLIPART = Path("/usr/share/openclipart/png")
THRESHOLDS = (0.6, 0.9, 0.99, 0.995, 0.999, 0.9995, 0.9999)


def jpeg(img: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def scaled(img: Image.Image, s: float) -> Image.Image:
    return img.resize((max(8, int(img.width * s)), max(8, int(img.height * s))), Image.Resampling.BICUBIC)


def stats(v: np.ndarray) -> str:
    if not len(v):
        return "-"
    q = np.quantile(v, [0.01, 0.5, 0.99, 0.999])
    return (f"min {v.min():.4f} p1 {q[0]:.4f} p50 {q[1]:.4f} p99 {q[2]:.4f} p99.9 {q[3]:.4f} "
            f"max {v.max():.4f} (n={len(v)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--category", default="food")
    ap.add_argument("--n-generated", type=int, default=24)
    ap.add_argument("--resize", type=int, default=0, help="0 = the tiny model's preset")
    args = ap.parse_args()

    from pas.curate.dedup import dedup
    from pas.data.images import BadImage, load_rgb
    from pas.models.sscd import build_tiny_sscd, descriptors, load_sscd, read_preset

    tmp = Path(tempfile.mkdtemp())
    sscd_dir = build_tiny_sscd(tmp / "sscd", seed=0)
    model = load_sscd(sscd_dir)
    resize = args.resize or read_preset(sscd_dir)["resize"]

    files = sorted((CLIPART / args.category).rglob("*.png"))
    imgs, digests = [], []
    for f in files:
        try:
            imgs.append(load_rgb(f, max_side=256))        # as the pool stores them
            digests.append(hashlib.sha256(f.read_bytes()).hexdigest())
        except BadImage:
            continue
    t0 = time.perf_counter()
    a = descriptors(model, imgs, resize=resize, batch_size=32)
    dt = time.perf_counter() - t0
    print(f"# tiny SSCD (seed 0), resize {resize}: {len(imgs)} {args.category} clipart images, "
          f"{len(imgs) / dt:.1f} img/s on CPU")
    s = a @ a.T
    iu = np.triu_indices(len(a), 1)
    same_file = np.asarray(digests)[iu[0]] == np.asarray(digests)[iu[1]]
    print(f"unrelated pairs (different files): {stats(s[iu][~same_file])}")
    print(f"byte-identical files in the library: {stats(s[iu][same_file])}")
    variants = {
        "exact copy": lambda im: im.copy(),
        "JPEG q90": lambda im: jpeg(im, 90),
        "JPEG q75": lambda im: jpeg(im, 75),
        "0.8x + JPEG q90": lambda im: jpeg(scaled(im, 0.8), 90),
        "0.5x + JPEG q75": lambda im: jpeg(scaled(im, 0.5), 75),
        "horizontal flip (not a copy for SSCD's training, listed for reference)": ImageOps.mirror,
    }
    for name, fn in variants.items():
        b = descriptors(model, [fn(im) for im in imgs], resize=resize, batch_size=32)
        c = (a * b).sum(1)
        top1 = float((np.argmax(b @ a.T, 1) == np.arange(len(a))).mean())
        print(f"{name}: cos to original {stats(c)}; nearest is the original {top1:.3f}")
    keys = [f"k{i:05d}" for i in range(len(a))]
    print("dedup of the clipart set alone (k=64), images removed per λ_dup:",
          {t: int((~dedup(keys, a, t, 64)["kept"]).sum()) for t in THRESHOLDS})
    if args.n_generated:
        import torch

        from pas.models.diffusion import build_tiny_sd, load_pipeline

        pipe = load_pipeline(build_tiny_sd(tmp / "sd", seed=0))
        gens = []
        for i in range(args.n_generated):
            g = torch.Generator().manual_seed(i)
            out = pipe(f"a photo of dish {i % 6}", num_inference_steps=2, generator=g, height=64, width=64,
                       output_type="pil")
            gens.append(out.images[0])
        gd = descriptors(model, gens, resize=resize, batch_size=32)
        gs = gd @ gd.T
        print(f"tiny-SD generated images ({len(gens)}, 64 px), pairs: {stats(gs[np.triu_indices(len(gd), 1)])}")
        print(f"generated vs clipart: {stats((gd @ a.T).ravel())}")
        allx = np.concatenate([a, gd])
        allk = keys + [f"g{i:05d}" for i in range(len(gd))]
        print("dedup of clipart + generated, removed (clipart, generated) per λ_dup:",
              {t: (int((~(m := dedup(allk, allx, t, 64))["kept"][: len(a)]).sum()),
                   int((~m["kept"][len(a):]).sum())) for t in THRESHOLDS})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

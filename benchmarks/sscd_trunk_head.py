"""Benchmark: a copy descriptor from the offline CLIP's frozen trunk (PP-OCRv4 det backbone) + a trained head.

SSCD starts from a pretrained trunk; the only pretrained image network offline is the text detector's
backbone (`pas.models.det_trunk`). This trains SSCD's loss on top of it, frozen: trunk features of each
pool image (96 px crops, `SscdTrainSpec.train_size`) unedited and `--views` copy edits (`augment_batch`,
crops ≥ 0.5), standardised, then an MLP head → 128-d, L2, trained with InfoNCE (lightly's NTXentLoss,
τ `--tau`) between a view or the original and another view of the same image — or, `--full`, each view
against every pool original (all 8k images as negatives: the hard near-identical ones are always in).
Measured as `offline_models.sscd_rates` (1,000 planted `copy_augment` copies, held-out seed 12345, crops
≥ 0.5; copy groups), plus the false merges among the 1,000 sampled originals only (DISC21-style: a
distractor set, not the whole pool with its near-identical siblings).

    python benchmarks/sscd_trunk_head.py --features grid --out benchmarks/results-sscd-trunk-head.json
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from _common import emit

LAMBDAS = (0.5, 0.6, 0.7, 0.8, 0.9)


def trunk_features(trunk, x, grid: bool) -> np.ndarray:
    """(B, 3, S, S) ImageNet-normalised views → trunk features: mean+max of both maps, and with `grid`
    also 3×3 average pools of both (the layout that mean/max pooling loses)."""
    import torch

    from pas.models.det_trunk import RGB_MEAN, RGB_STD
    from pas.models.sscd import IMAGENET_MEAN, IMAGENET_STD

    m, sd = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    rm, rs = (torch.tensor(v).view(1, 3, 1, 1) for v in (RGB_MEAN, RGB_STD))
    x = ((x * sd + m - rm) / rs).numpy().astype(np.float32)
    if not grid:
        return trunk(x)
    maps = [torch.from_numpy(a) for a in trunk.maps(x)]
    parts = ([torch.nn.functional.adaptive_avg_pool2d(a, 3).flatten(1) for a in maps]
             + [a.amax((2, 3)) for a in maps] + [a.mean((2, 3)) for a in maps])
    return torch.cat(parts, 1).numpy()


def rates(E: np.ndarray, C: np.ndarray, idx: np.ndarray, groups: np.ndarray) -> dict:
    cs = (E[idx] * C).sum(1)
    S = E @ E.T
    S[groups[:, None] == groups[None, :]] = -1
    pool_nd = S.max(1)                                     # nearest other-group image, whole pool
    sample_nd = S[np.ix_(idx, idx)].max(1)                 # … among the sampled originals only
    q = lambda v, p: round(float(np.quantile(v, p)), 4)    # noqa: E731
    out = {"copy_q05": q(cs, 0.05), "copy_median": q(cs, 0.5), "pool_distinct_median": q(pool_nd, 0.5),
           "top1": round(float(((C @ E.T).argmax(1) == idx).mean()), 4)}
    for name, nd in (("pool", pool_nd), ("sample", sample_nd)):
        lam = float(np.quantile(nd, 0.99))
        out[f"{name}_lambda_false_0.01"] = round(lam, 4)
        out[f"{name}_recall_at_it"] = round(float((cs > lam).mean()), 4)
    out["per_lambda"] = {str(x): {"recall": round(float((cs > x).mean()), 4),
                                  "false_pool": round(float((pool_nd > x).mean()), 4),
                                  "false_sample": round(float((sample_nd > x).mean()), 4)} for x in LAMBDAS}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", choices=["meanmax", "grid"], default="grid")
    ap.add_argument("--size", type=int, default=96, help="trunk input side")
    ap.add_argument("--views", type=int, default=3, help="copy edits per pool image")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--tau", type=float, default=0.05)
    ap.add_argument("--full", action="store_true", help="every pool original as a negative")
    ap.add_argument("--pool-index", default="data/pool/index.parquet")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import pandas as pd
    import torch
    from lightly.loss import NTXentLoss
    from PIL import Image

    from _common import copy_augment
    from offline_models import copy_groups
    from pas.data.pool import PoolParams
    from pas.models.det_trunk import DetTrunk
    from pas.models.pool_pairs import load_pool_pairs
    from pas.models.sscd_train import augment_batch, plain_batch

    torch.set_num_threads(1)
    t0 = time.time()
    pairs = load_pool_pairs(PoolParams(max_side=256), 96)
    paths = dict(pd.read_parquet(args.pool_index)[["key", "path"]].itertuples(index=False))
    groups = copy_groups([paths[k] for k in pairs.keys], pairs.images)
    trunk, grid, n = DetTrunk(threads=2), args.features == "grid", len(pairs.keys)
    images = torch.from_numpy(pairs.images)
    feats = lambda fn: np.concatenate([trunk_features(trunk, fn(images[i:i + 256]), grid)   # noqa: E731
                                       for i in range(0, n, 256)])
    O = feats(lambda b: plain_batch(b, args.size))
    gen = torch.Generator().manual_seed(0)
    A = np.stack([feats(lambda b: augment_batch(b, gen, args.size, 0.5)) for _ in range(args.views)])
    rng = np.random.default_rng(12345)
    idx = rng.choice(n, 1000, replace=False)
    copies = np.stack([np.asarray(copy_augment(96, rng, 0.5)(Image.fromarray(pairs.images[i]))) for i in idx])
    C = trunk_features(trunk, plain_batch(torch.from_numpy(copies), args.size), grid)
    t_feat = time.time() - t0
    mu, sd = O.mean(0), O.std(0) + 1e-6
    std = lambda x: torch.from_numpy((x - mu) / sd).float()                              # noqa: E731
    O_, A_, C_ = std(O), torch.stack([std(a) for a in A]), std(C)
    res = {"features": args.features, "size": args.size, "dim": int(O.shape[1]), "views": args.views,
           "epochs": args.epochs, "tau": args.tau, "full": args.full, "n_pool": n,
           "n_groups": int(len(set(groups.tolist()))), "feature_seconds": round(t_feat, 1)}
    norm = lambda z: torch.nn.functional.normalize(z, dim=1)                             # noqa: E731
    res["raw"] = rates(norm(O_).numpy(), norm(C_).numpy(), idx, groups)
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(O.shape[1], 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 128))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    nt, bs, k = NTXentLoss(temperature=args.tau), 512, args.views
    steps, step, t1 = args.epochs * (n // bs), 0, time.time()
    views = torch.cat([O_[None], A_])
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(n // bs):
            i = perm[b * bs:(b + 1) * bs]
            v1 = views[torch.randint(0, k + 1, (len(i),), generator=gen), i]
            v2 = A_[torch.randint(0, k, (len(i),), generator=gen), i]
            for g in opt.param_groups:
                g["lr"] = 1e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
            z2 = norm(head(v2))
            loss = (torch.nn.functional.cross_entropy(z2 @ norm(head(O_)).T / args.tau, i) if args.full
                    else nt(norm(head(v1)), z2))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        res["head"] = rates(norm(head(O_)).numpy(), norm(head(C_)).numpy(), idx, groups)
    res["head"]["final_loss"], res["head"]["train_seconds"] = round(loss.item(), 4), round(time.time() - t1, 1)
    emit(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

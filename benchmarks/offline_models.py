"""The offline models against the random-init ones they replace, on the default pool (openclipart).

CLIP: precision@k of text→image retrieval for a fixed list of food concepts (an image counts when its
pool category is under `food/`: evaluation labels only), and the same with the alt-text embeddings
themselves (the ceiling a perfect image tower reaches); and the pipeline's own retrieve precision
(metrics/precision.json: unique images among the top k_retrieve of each accepted concept of the bank,
over the pool stage's stored images), for the given CLIP and optionally a candidate recipe trained here.
SSCD: planted copies — each of N pool images edited once by `copy_augment` with a held-out seed — found
above λ (recall), and pool images whose nearest image of another copy group (`copy_groups`: openclipart's
own duplicates, e.g. one file in several folders, colour and `_bw` versions) is above λ (the false-merge
rate).

    python benchmarks/offline_models.py --clip models/clip [--train-clip '{"epochs": 14}'] [--sscd DIR]
    python benchmarks/offline_models.py --sscd-only --sscd DIR [--copy-min-area 0.5] [--with-tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import emit

CONCEPTS = ["pizza", "sushi", "apple pie", "hamburger", "spaghetti", "fruit salad", "cheese", "bread",
            "ice cream", "roast chicken", "tacos", "soup", "banana", "grapes", "steak", "chocolate cake",
            "coffee", "wine", "salad", "french fries"]


def pool_images(pool_dir) -> tuple[list, list[str], np.ndarray]:
    """The pool's stored images (PIL, as the pool stage embedded them), keys and in-domain labels
    (category under food/: evaluation labels only), in index order."""
    import pandas as pd

    from pas.io.shards import iter_samples, list_shards

    index = pd.read_parquet(Path(pool_dir) / "index.parquet")
    by_key = {s.key: s.pil() for s in iter_samples(list_shards(pool_dir))}
    keys = index["key"].astype(str).tolist()
    food = index["category"].astype(str).str.match(r"food(/|$)").to_numpy()
    return [by_key[k] for k in keys], keys, food


def bank_prompts(bank_path, template: str) -> list[str]:
    """The retrieve prompts of the bank's accepted concepts."""
    import pandas as pd

    from pas.collect.retrieve import prompt_for

    bank = pd.read_parquet(bank_path)
    return [prompt_for(c, template) for c in bank.loc[bank["accepted"], "concept"].astype(str)]


def topk_precision(T, E, food, k: int) -> dict:
    """Top-k images (rows of E) by cosine for each text (rows of T): precision over the unique images
    (as metrics/precision.json) and the mean precision per hit."""
    top = np.argsort(-(T @ E.T), axis=1, kind="stable")[:, :k]
    uniq = np.unique(top)
    return {"n_concepts": len(T), "unique": int(len(uniq)),
            "precision": round(float(food[uniq].mean()), 4), "per_hit": round(float(food[top].mean()), 4)}


def bank_precision(clip_dir, images, food, bank_path, template: str, k: int) -> dict:
    """The pipeline's retrieve precision: top-k pool images by cosine(TE(template(c)), VE(I)) for each
    accepted concept of the bank (`topk_precision`)."""
    from pas.models.clip import load_clip

    clip = load_clip(clip_dir)
    E = clip.encode_images(images, batch_size=256)
    return topk_precision(clip.encode_texts(bank_prompts(bank_path, template)), E, food, k)


def train_candidate(spec_json: str, out_dir) -> dict:
    """Train a `models.clip: {kind: trained, ...}` candidate (JSON of ClipTrainSpec overrides) on the
    pool into `out_dir` as the models stage does; returns its training metrics and wall time."""
    from pas.data.pool import PoolParams
    from pas.models.clip_train import ClipTrainSpec, train_clip
    from pas.models.llm import resolve_llm_source
    from pas.models.pool_pairs import load_pool_pairs

    spec = ClipTrainSpec(**json.loads(spec_json))
    pairs = load_pool_pairs(PoolParams(max_side=256), spec.image_size)
    t0 = time.time()
    stats = train_clip(pairs, spec, resolve_llm_source(spec.text_tower).path, out_dir)
    return {**stats, "train_seconds": round(time.time() - t0, 1)}


def clip_precision(clip_dir, pairs, food, k: int) -> float:
    from pas.models.clip import load_clip

    clip = load_clip(clip_dir)
    E = clip.encode_images([Image.fromarray(a) for a in pairs.images], batch_size=256)
    T = clip.encode_texts([f"a photo of {c}." for c in CONCEPTS])
    return topk_precision(T, E, food, k)["per_hit"]


def copy_groups(paths, images) -> np.ndarray:
    """Group id per pool image: images that are the same picture in openclipart — the same file stem
    (one drawing filed under several folders), the same stem but for a `_bw` token (colour and
    black-and-white versions) or pixel-identical crops. A merge inside a group is no false merge."""
    import hashlib
    import re

    parent = list(range(len(paths)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    stems = [re.sub(r"_bw(?=_|$)", "", Path(p).stem) for p in paths]
    digests = [hashlib.sha256(a.tobytes()).hexdigest() for a in images]
    for names in (stems, digests):
        first: dict = {}
        for i, name in enumerate(names):
            if name in first:
                parent[root(i)] = root(first[name])
            else:
                first[name] = i
    return np.asarray([root(i) for i in range(len(paths))])


def sscd_rates(sscd_dir, pairs, groups, n: int, lambdas, min_area: float) -> dict:
    """Planted copies of `n` pool images (one `copy_augment` edit each, held-out seed, crops of
    ≥ `min_area`): recall = copies whose cosine to their original is above λ; false merge = pool images
    whose nearest image of another `copy_groups` group is above λ (over the whole pool). The λ chosen is
    the lowest with ≤ 1% false merges."""
    from _common import copy_augment
    from pas.models.sscd import descriptors, load_sscd, read_preset

    model, resize = load_sscd(sscd_dir), read_preset(sscd_dir)["resize"]
    rng = np.random.default_rng(12345)
    idx = rng.choice(len(pairs.keys), n, replace=False)
    pool = [Image.fromarray(a) for a in pairs.images]
    copies = [copy_augment(pairs.images.shape[1], rng, min_area)(pool[i]) for i in idx]
    E = descriptors(model, pool, resize=resize, batch_size=256)
    C = descriptors(model, copies, resize=resize, batch_size=256)
    copy_sim = (E[idx] * C).sum(1)
    top1 = float(((C @ E.T).argmax(1) == idx).mean())   # the copy's nearest pool image is its original
    S = E @ E.T
    S[groups[:, None] == groups[None, :]] = -1
    distinct = S.max(1)
    q = (0.01, 0.05, 0.5, 0.95, 0.99, 0.999)
    lam = float(np.quantile(distinct, 0.99))        # the lowest λ with ≤ 1% false merges
    return {"copy_sim_quantiles": dict(zip(map(str, q), np.round(np.quantile(copy_sim, q), 4).tolist())),
            "nearest_distinct_quantiles": dict(zip(map(str, q), np.round(np.quantile(distinct, q), 4).tolist())),
            "per_lambda": {str(x): {"copy_recall": round(float((copy_sim > x).mean()), 4),
                                    "false_merge": round(float((distinct > x).mean()), 4)} for x in lambdas},
            "lambda_false_0.01": round(lam, 4), "copy_recall_at_it": round(float((copy_sim > lam).mean()), 4),
            "copy_top1": round(top1, 4)}


def sscd_main(args) -> dict:
    """The SSCD part: the given model and the random-init tiny SSCD on the same planted copies."""
    import pandas as pd

    from pas.data.pool import PoolParams
    from pas.models import sscd as sscd_mod
    from pas.models.pool_pairs import load_pool_pairs

    pairs = load_pool_pairs(PoolParams(max_side=256), 96)         # SscdTrainSpec.train_size
    index = pd.read_parquet(args.pool_index)
    paths = dict(zip(index["key"], index["path"]))
    groups = copy_groups([paths[k] for k in pairs.keys], pairs.images)
    lambdas = (0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9995)
    res = {"n_pool": len(pairs.keys), "n_groups": int(len(set(groups.tolist()))), "copies": args.copies,
           "copy_min_area": args.copy_min_area}
    t0 = time.time()
    res["given"] = sscd_rates(args.sscd, pairs, groups, args.copies, lambdas, args.copy_min_area)
    res["given"]["seconds"] = round(time.time() - t0, 1)
    if args.with_tiny:
        with tempfile.TemporaryDirectory() as tmp:
            sscd_mod.build_tiny_sscd(Path(tmp) / "sscd")
            res["tiny_random"] = sscd_rates(Path(tmp) / "sscd", pairs, groups, args.copies, lambdas,
                                            args.copy_min_area)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", default="models/clip")
    ap.add_argument("--sscd", default=None, help="an SSCD folder to measure (e.g. one trained with "
                    "models.sscd: {kind: trained}); the random-init tiny SSCD is measured beside it")
    ap.add_argument("--pool", default="data/pool", help="the pool stage's output (its stored images)")
    ap.add_argument("--bank", default="data/concepts/bank.parquet", help="the concept bank retrieve searched")
    ap.add_argument("--prompt", default="a photo of {c}, a type of food.", help="retrieve.prompt_template")
    ap.add_argument("--train-clip", default=None, metavar="JSON",
                    help='train a CLIP candidate (ClipTrainSpec overrides, e.g. \'{"epochs": 14}\') and measure it '
                    "beside --clip")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--copies", type=int, default=1000)
    ap.add_argument("--copy-min-area", type=float, default=0.25, help="smallest crop of a planted copy")
    ap.add_argument("--pool-index", default="data/pool/index.parquet", help="pool paths, for copy_groups")
    ap.add_argument("--with-tiny", action="store_true", help="measure the random-init tiny SSCD too (slow)")
    ap.add_argument("--sscd-only", action="store_true", help="the SSCD part only (needs --sscd)")
    ap.add_argument("--out", default="benchmarks/results-offline-models.json")
    args = ap.parse_args()
    from pas.data.pool import PoolParams
    from pas.models import clip as clip_mod
    from pas.models.pool_pairs import load_pool_pairs

    t0 = time.time()
    if args.sscd_only:
        res = sscd_main(args)
        res["seconds"] = round(time.time() - t0, 1)
        emit(res, args.out)
        return
    pairs = load_pool_pairs(PoolParams(max_side=256), 64)
    food = np.asarray([t.startswith("food") for t in pairs.texts])  # alt texts start with the folder path
    res = {"n_pool": len(pairs.keys), "chance": round(float(food.mean()), 4), "k": args.k}
    with tempfile.TemporaryDirectory() as tmp:
        clip_mod.build_tiny_clip(Path(tmp) / "clip")
        res["clip_precision"] = {"trained": round(clip_precision(args.clip, pairs, food, args.k), 4),
                                 "tiny_random": round(clip_precision(Path(tmp) / "clip", pairs, food, args.k), 4)}
        images, _, pool_food = pool_images(args.pool)
        res["retrieve_precision"] = {"given": bank_precision(args.clip, images, pool_food, args.bank, args.prompt, args.k)}
        if args.train_clip:
            res["candidate"] = {"spec": json.loads(args.train_clip),
                                **train_candidate(args.train_clip, Path(tmp) / "candidate")}
            res["retrieve_precision"]["candidate"] = bank_precision(Path(tmp) / "candidate", images, pool_food,
                                                                    args.bank, args.prompt, args.k)
            res["clip_precision"]["candidate"] = round(clip_precision(Path(tmp) / "candidate", pairs, food,
                                                                      args.k), 4)
        from pas.models.clip import load_clip

        c = load_clip(args.clip)
        A = c.encode_texts(pairs.texts)
        T = c.encode_texts([f"a photo of {x}." for x in CONCEPTS])
        res["clip_precision"]["alt_text_ceiling"] = round(float(
            food[np.argsort(-(T @ A.T), axis=1, kind="stable")[:, :args.k]].mean()), 4)
    if args.sscd:
        res["sscd"] = sscd_main(args)
    res["seconds"] = round(time.time() - t0, 1)
    emit(res, args.out)


if __name__ == "__main__":
    main()

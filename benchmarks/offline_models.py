"""The offline models against the random-init ones they replace, on the default pool (openclipart).

CLIP: precision@k of text→image retrieval for a fixed list of food concepts (an image counts when its
pool category is under `food/`: evaluation labels only), and the same with the alt-text embeddings
themselves (the ceiling a perfect image tower reaches); and the pipeline's own retrieve precision
(metrics/precision.json: unique images among the top k_retrieve of each accepted concept of the bank,
over the pool stage's stored images), for the given CLIP and optionally a candidate recipe trained here. SSCD: planted copies — each of N pool images
edited once by `copy_augment` with a held-out seed — found above λ (recall), and distinct pool images
whose nearest other image is above λ (the false-merge rate; openclipart holds real near-copies, e.g.
colour and `_bw` versions, which count here too).

    python benchmarks/offline_models.py --clip models/clip [--train-clip '{"epochs": 14}'] [--sscd DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

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


def bank_precision(clip_dir, images, food, bank_path, template: str, k: int) -> dict:
    """The pipeline's retrieve precision: top-k pool images by cosine(TE(template(c)), VE(I)) for each
    accepted concept of the bank, precision over the unique images (as metrics/precision.json), and
    the mean precision per hit."""
    import pandas as pd

    from pas.collect.retrieve import prompt_for
    from pas.models.clip import load_clip

    bank = pd.read_parquet(bank_path)
    concepts = bank.loc[bank["accepted"], "concept"].astype(str).tolist()
    clip = load_clip(clip_dir)
    E = clip.encode_images(images, batch_size=256)
    T = clip.encode_texts([prompt_for(c, template) for c in concepts])
    top = np.argsort(-(T @ E.T), axis=1, kind="stable")[:, :k]
    uniq = np.unique(top)
    return {"n_concepts": len(concepts), "unique": int(len(uniq)),
            "precision": round(float(food[uniq].mean()), 4), "per_hit": round(float(food[top].mean()), 4)}


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
    top = np.argsort(-(T @ E.T), axis=1, kind="stable")[:, :k]
    return float(food[top].mean())


def sscd_rates(sscd_dir, pairs, n: int, lambdas) -> dict:
    from pas.models.sscd import descriptors, load_sscd, read_preset
    from pas.models.sscd_train import copy_augment

    model, resize = load_sscd(sscd_dir), read_preset(sscd_dir)["resize"]
    rng = np.random.default_rng(12345)
    idx = rng.choice(len(pairs.keys), n, replace=False)
    orig = [Image.fromarray(pairs.images[i]) for i in idx]
    copies = [copy_augment(pairs.images.shape[1], rng)(im) for im in orig]
    a, b = descriptors(model, orig, resize=resize), descriptors(model, copies, resize=resize)
    copy_sim = (a * b).sum(1)
    S = a @ a.T
    np.fill_diagonal(S, -1)
    nn = S.max(1)
    return {str(lam): {"copy_recall": round(float((copy_sim > lam).mean()), 4),
                       "false_merge": round(float((nn > lam).mean()), 4)} for lam in lambdas}


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
    ap.add_argument("--out", default="benchmarks/results-offline-models.json")
    args = ap.parse_args()
    from pas.data.pool import PoolParams
    from pas.models import clip as clip_mod
    from pas.models import sscd as sscd_mod
    from pas.models.pool_pairs import load_pool_pairs

    t0 = time.time()
    pairs = load_pool_pairs(PoolParams(max_side=256), 64)
    food = np.asarray([t.startswith("food") for t in pairs.texts])  # alt texts start with the folder path
    res = {"n_pool": len(pairs.keys), "chance": round(float(food.mean()), 4), "k": args.k}
    with tempfile.TemporaryDirectory() as tmp:
        clip_mod.build_tiny_clip(Path(tmp) / "clip")
        if args.sscd:
            sscd_mod.build_tiny_sscd(Path(tmp) / "sscd")
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
            lambdas = (0.5, 0.6, 0.7, 0.8, 0.9, 0.9995)
            res["sscd"] = {"given": sscd_rates(args.sscd, pairs, args.copies, lambdas),
                           "tiny_random": sscd_rates(Path(tmp) / "sscd", pairs, args.copies, lambdas)}
    res["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

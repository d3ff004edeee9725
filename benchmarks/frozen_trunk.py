"""The frozen pretrained trunk + a small trained head as the offline image tower (behind the default).

The only pretrained image networks offline are rapidocr-onnxruntime's ONNX models. This takes the
PP-OCRv4 text detector's backbone (PPLCNetV3, the DBNet det model): the graph cut after the given
backbone stages (`--nodes`, default the ends of its stride-16 and stride-32 stages), each feature map
globally mean- and max-pooled, for the pool stage's stored images (square centre crops, `--size`; the
horizontal flip as a second view). A head (linear or 2-layer MLP) on those frozen, standardised features
is trained against the frozen all-MiniLM-L6-v2 embeddings of the alt texts, with the offline CLIP's
contrastive loss (`pas.models.clip_train.clip_loss`) or a cosine regression onto the alt-text embedding,
for several seeds. Its image embeddings are then measured as `offline_models.py` measures a CLIP: the
pipeline's retrieve precision over the bank (`topk_precision`, the bank's prompts through the text tower
of `--clip`) and the 20-concept fixed p@20, beside the committed CLIP (`--clip`) in the same run.

The pool is both training and retrieval set (as for the `models` stage's trained CLIP), so a head can
score by memorising alt texts; `--folds F` also measures out-of-fold embeddings (each image embedded
by the head trained on the other folds, folds by `copy_groups`), the generalisation part.
`--scratch-seeds` trains the from-scratch tower of `clip_train` (open_clip ModifiedResNet, same spec)
with the cosine-regression loss instead of the contrastive one, for comparison: in pool, or with
`--scratch-folds` out of fold (one training per fold on the other folds, the same folds). `--oof-seeds`
sets the out-of-fold heads' seeds; `--skip-in-pool` leaves out the in-pool heads.

The trunk is `pas.models.det_trunk` (the `models` stage's default CLIP tower since this measurement);
`--nodes` cuts it elsewhere.

    python benchmarks/frozen_trunk.py --clip models/clip --pool data/pool --bank data/concepts/bank.parquet
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from _common import emit
from pas.models.det_trunk import NODES, RGB_MEAN, RGB_STD


def trunk_input(images, size: int, flip: bool) -> np.ndarray:
    """PIL images → (B, 3, size, size) float32: shortest side → size, centre crop, normalised as
    `DetTrunk` takes them (RGB, `RGB_MEAN` / `RGB_STD`; it flips to the detector's BGR)."""
    from pas.models.pool_pairs import square_crop

    x = np.stack([np.asarray(square_crop(im.convert("RGB"), size), np.float32) for im in images]) / 255.0
    if flip:
        x = x[:, :, ::-1]
    x = (x - np.asarray(RGB_MEAN, np.float32)) / np.asarray(RGB_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def trunk_features(images, size: int, nodes: list[str], flip: bool, threads: int, batch: int = 32) -> np.ndarray:
    """(N, sum 2·C) float32: each node's feature map mean- and max-pooled over space."""
    from pas.models.det_trunk import DetTrunk

    trunk = DetTrunk(nodes, threads)
    return np.concatenate([trunk(trunk_input(images[i:i + batch], size, flip))
                           for i in range(0, len(images), batch)]).astype(np.float32)


def time_trunk(sizes, nodes: list[str], threads: int, batch: int = 32) -> dict:
    """Trunk-only throughput (img/s) on random input per side: one warm-up batch, one timed batch."""
    from pas.models.det_trunk import DetTrunk

    trunk = DetTrunk(nodes, threads)
    out = {}
    for size in sizes:
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        trunk(x[:4])
        t0 = time.perf_counter()
        trunk(x)
        out[str(size)] = round(batch / (time.perf_counter() - t0), 1)
    return out


def time_head(threads, steps: int = 40, n: int = 4096, dim: int = 1152) -> list:
    """ms per training step of the MLP head (`train_head`'s shapes and cos loss) per thread count."""
    import torch
    import torch.nn.functional as F

    out = []
    for th in threads:
        torch.set_num_threads(th)
        torch.manual_seed(0)
        X, t = torch.randn(2, n, dim), F.normalize(torch.randn(n, 384), dim=-1)
        head = torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 384))
        opt = torch.optim.AdamW(head.parameters(), 1e-3)
        t0 = time.perf_counter()
        for _ in range(steps):
            idx, view = torch.randint(0, n, (256,)), torch.randint(0, 2, (256,))
            loss = (1 - (F.normalize(head(X[view, idx]), dim=-1) * t[idx]).sum(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append({"threads": th, "ms": round((time.perf_counter() - t0) / steps * 1000, 1)})
    return out


def train_head(X, t, text_ids, train_idx, *, kind: str, loss: str, seed: int, epochs: int, lr: float,
               weight_decay: float = 0.05, batch: int = 256, hidden: int = 1024):
    """A head on frozen features X (V, N, F) (V views) → normalised embedding, trained on `train_idx`.
    loss "clip": `clip_loss` with a learnt logit scale (init 1/0.07, ≤ 100, as clip_train); "cos":
    1 − cos(head(x), t[id]). Returns the head (eval mode)."""
    import torch
    import torch.nn.functional as F

    from pas.models.clip_train import clip_loss
    from pas.models.files import seed_everything
    from pas.train.schedule import adamw, lr_factor

    seed_everything(seed)
    dim_in, dim_out = X.shape[2], t.shape[1]
    head = (torch.nn.Linear(dim_in, dim_out) if kind == "linear" else
            torch.nn.Sequential(torch.nn.Linear(dim_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim_out)))
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = adamw(list(head.parameters()) + ([logit_scale] if loss == "clip" else []), lr, weight_decay)
    X, t = torch.from_numpy(X), torch.from_numpy(t)
    ids_all = torch.from_numpy(text_ids.astype(np.int64))
    train_idx = torch.from_numpy(np.asarray(train_idx, np.int64))
    n = len(train_idx)
    steps = max(1, n // batch)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        perm = train_idx[torch.randperm(n, generator=gen)]
        for b in range(steps):
            idx = perm[b * batch:(b + 1) * batch]
            view = torch.randint(0, X.shape[0], (len(idx),), generator=gen)
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, steps, epochs, 1.0, "cosine")
            f = F.normalize(head(X[view, idx]), dim=-1)
            ids = ids_all[idx]
            if loss == "clip":
                out = clip_loss(f, t, ids, logit_scale.exp().clamp(max=100.0))
            else:
                out = (1.0 - (f * t[ids]).sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            with torch.no_grad():
                logit_scale.clamp_(0, math.log(100.0))
            step += 1
    return head.eval()


def embed(head, X0) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        return F.normalize(head(torch.from_numpy(X0)), dim=-1).numpy()


def folds_by_group(groups: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold per image; all images of a copy group in one fold."""
    uniq = np.unique(groups)
    fold_of = dict(zip(uniq.tolist(), np.random.default_rng(seed).permutation(len(uniq)) % n_folds))
    return np.asarray([fold_of[g] for g in groups.tolist()])


def train_scratch_cos(images, t, text_ids, seed: int, threads: int, train_idx=None, embed_idx=None) -> np.ndarray:
    """clip_train's from-scratch image tower (ModifiedResNet, `RESNET_RECIPE`: 64 px, 10 epochs, its
    augmentation and schedule) trained from scratch to regress the alt-text embedding (1 − cos), on the
    images `train_idx` (default all); returns the embeddings of the images `embed_idx` (default all)."""
    import open_clip.model
    import torch
    import torch.nn.functional as F

    from pas.models.clip_train import RESNET_RECIPE, ClipTrainSpec, _augment, _normalize
    from pas.models.files import seed_everything
    from pas.train.schedule import adamw, lr_factor

    spec = ClipTrainSpec(**RESNET_RECIPE, seed=seed)
    torch.set_num_threads(threads)
    seed_everything(seed)
    visual = open_clip.model._build_vision_tower(t.shape[1], {"image_size": spec.image_size, **spec.vision})
    opt = adamw([p for p in visual.parameters() if p.requires_grad], spec.lr, spec.weight_decay)
    train_idx = np.arange(len(images)) if train_idx is None else np.asarray(train_idx)
    embed_idx = np.arange(len(images)) if embed_idx is None else np.asarray(embed_idx)
    x_all, t = torch.from_numpy(images[train_idx]), torch.from_numpy(t)
    ids_all = torch.from_numpy(text_ids[train_idx].astype(np.int64))
    n, bs = len(train_idx), spec.batch_size
    steps = max(1, n // bs)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    visual.train()
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(steps):
            idx = perm[b * bs:(b + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = spec.lr * lr_factor(step, steps, spec.epochs, spec.warmup_epochs, "cosine")
            f = F.normalize(visual(_normalize(_augment(x_all[idx], gen, spec.image_size, spec.min_scale))), dim=-1)
            loss = (1.0 - (f * t[ids_all[idx]]).sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    visual.eval()
    x_emb = torch.from_numpy(images[embed_idx])
    with torch.inference_mode():
        return torch.cat([F.normalize(visual(_normalize(x_emb[i:i + 256].permute(0, 3, 1, 2).float().div(255.0))),
                                      dim=-1) for i in range(0, len(x_emb), 256)]).numpy()


def oof_default_clip(pairs, images, fold: np.ndarray, threads: int) -> np.ndarray:
    """Out-of-fold embeddings of the from-scratch recipe (`RESNET_RECIPE`, no "no" head): per fold a
    CLIP trained by `train_clip` on the other folds' pairs embeds this fold's stored images."""
    import tempfile

    from pas.models.clip import load_clip
    from pas.models.clip_train import RESNET_RECIPE, ClipTrainSpec, train_clip
    from pas.models.llm import resolve_llm_source
    from pas.models.pool_pairs import PoolPairs

    spec = ClipTrainSpec(**RESNET_RECIPE, no_head_steps=0, threads=threads)
    E = None
    for f in np.unique(fold):
        tr = np.flatnonzero(fold != f)
        sub = PoolPairs([pairs.keys[i] for i in tr], pairs.images[tr], [pairs.texts[i] for i in tr])
        with tempfile.TemporaryDirectory() as tmp:
            train_clip(sub, spec, resolve_llm_source(spec.text_tower).path, tmp)
            held = np.flatnonzero(fold == f)
            e = load_clip(tmp).encode_images([images[i] for i in held], batch_size=256)
        E = np.zeros((len(fold), e.shape[1]), np.float32) if E is None else E
        E[held] = e
    return E


def main() -> None:
    import offline_models as om

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--clip", default="models/clip", help="the committed CLIP: measured beside, and its "
                    "(frozen MiniLM) text tower embeds the alt texts and prompts")
    ap.add_argument("--pool", default="data/pool", help="the pool stage's output (its stored images)")
    ap.add_argument("--bank", default="data/concepts/bank.parquet")
    ap.add_argument("--prompt", default="a photo of {c}, a type of food.", help="retrieve.prompt_template")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--size", type=int, default=224, help="trunk input side (px)")
    ap.add_argument("--nodes", default=",".join(NODES), help="comma-separated ONNX node outputs to pool")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime / torch threads")
    ap.add_argument("--cache", default=None, help="folder for the extracted features (.npy), reused if there")
    ap.add_argument("--heads", default="linear,mlp")
    ap.add_argument("--losses", default="clip,cos")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--folds", type=int, default=0, help="also the out-of-fold measure with this many folds "
                    "(the --oof-seeds of each head)")
    ap.add_argument("--default-folds", action="store_true", help="the out-of-fold measure (--folds) of the "
                    "committed recipe too: one train_clip per fold (slow)")
    ap.add_argument("--skip-heads", action="store_true", help="no heads, in pool or out of fold (e.g. a "
                    "--default-folds run)")
    ap.add_argument("--skip-in-pool", action="store_true", help="no in-pool heads (the out-of-fold ones still)")
    ap.add_argument("--oof-seeds", default="0", help="seeds of the out-of-fold heads (--folds)")
    ap.add_argument("--scratch-seeds", default="", help="seeds of the from-scratch cosine-regression tower")
    ap.add_argument("--scratch-folds", action="store_true", help="measure the --scratch-seeds towers out of "
                    "fold (--folds; one training per fold on the other folds) instead of in pool")
    ap.add_argument("--time-sizes", default=None, help="only time the trunk at these sides (e.g. 128,160,224)")
    ap.add_argument("--time-head-threads", default=None, help="only time MLP head steps (cos loss, batch "
                    "256, random features) at these torch thread counts (e.g. 1,2,1,2)")
    ap.add_argument("--single-view", action="store_true", help="train the heads on the unflipped view only")
    ap.add_argument("--out", default="benchmarks/results-frozen-trunk.json")
    args = ap.parse_args()
    if args.time_head_threads:
        print(json.dumps({"ms_per_step": time_head(map(int, args.time_head_threads.split(",")))}))
        return
    if args.time_sizes:
        print(json.dumps({"threads": args.threads, "img_per_s": time_trunk(
            map(int, args.time_sizes.split(",")), args.nodes.split(","), args.threads)}))
        return
    import torch

    from pas.data.pool import PoolParams
    from pas.models.clip import load_clip
    from pas.models.pool_pairs import load_pool_pairs

    torch.set_num_threads(args.threads)
    t0 = time.time()
    images, keys, food = om.pool_images(args.pool)
    pairs = load_pool_pairs(PoolParams(max_side=256), 64)      # the alt texts, and offline_models' fixed p@k
    if pairs.keys != keys:
        raise SystemExit("the pool stage's images are not the pool's decode (another pool.source?)")
    uniq, text_ids = np.unique(np.asarray(pairs.texts, dtype=object).astype(str), return_inverse=True)
    clip = load_clip(args.clip)
    t_alt = clip.encode_texts(list(uniq))
    T_bank = clip.encode_texts(om.bank_prompts(args.bank, args.prompt))
    T_fixed = clip.encode_texts([f"a photo of {c}." for c in om.CONCEPTS])
    res: dict = {"n_pool": len(keys), "k": args.k, "size": args.size, "nodes": args.nodes.split(","),
                 "epochs": args.epochs, "lr": args.lr, "threads": args.threads}

    def measure(E) -> dict:
        return {**om.topk_precision(T_bank, E, food, args.k),
                "fixed_p_at_k": om.topk_precision(T_fixed, E, food, args.k)["per_hit"]}

    t1 = time.time()
    res["committed"] = {**om.bank_precision(args.clip, images, food, args.bank, args.prompt, args.k),
                        "fixed_p_at_k": round(om.clip_precision(args.clip, pairs, food, args.k), 4)}
    res["alt_text_ceiling"] = measure(t_alt[text_ids])
    res["committed"]["seconds"] = round(time.time() - t1, 1)

    nodes = args.nodes.split(",")
    views = []
    for flip in (False, True):
        cache = Path(args.cache) / f"det_{args.size}_{'_'.join(nodes)}_{'flip' if flip else 'orig'}.npy" \
            if args.cache else None
        t1 = time.time()
        if cache and cache.is_file():
            views.append(np.load(cache))
            continue
        views.append(trunk_features(images, args.size, nodes, flip, args.threads))
        res.setdefault("extract_seconds", []).append(round(time.time() - t1, 1))
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, views[-1])
    if "extract_seconds" in res:
        res["extract_img_per_s"] = round(len(images) / res["extract_seconds"][0], 1)
    X = np.stack(views[:1] if args.single_view else views)
    mu, sd = X[0].mean(0), X[0].std(0) + 1e-6                  # standardised on the pool's unflipped view
    X = ((X - mu) / sd).astype(np.float32)
    res["feature_dim"], res["views"] = int(X.shape[2]), int(X.shape[0])

    res["heads"] = []
    everyone = np.arange(len(keys))
    for kind in ([] if args.skip_heads or args.skip_in_pool else args.heads.split(",")):
        for loss in args.losses.split(","):
            for seed in map(int, args.seeds.split(",")):
                t1 = time.time()
                head = train_head(X, t_alt, text_ids, everyone, kind=kind, loss=loss, seed=seed,
                                  epochs=args.epochs, lr=args.lr)
                row = {"head": kind, "loss": loss, "seed": seed, **measure(embed(head, X[0])),
                       "train_seconds": round(time.time() - t1, 1)}
                res["heads"].append(row)
                print(json.dumps(row), flush=True)
    if args.folds:
        import pandas as pd

        paths = dict(zip(*pd.read_parquet(Path(args.pool) / "index.parquet")[["key", "path"]].T.values))
        groups = om.copy_groups([paths[k] for k in keys], [np.asarray(im) for im in images])
        fold = folds_by_group(groups, args.folds)
        res["out_of_fold"] = []
        if args.default_folds:
            t1 = time.time()
            row = {"head": "committed recipe (train_clip)", "folds": args.folds,
                   **measure(oof_default_clip(pairs, images, fold, args.threads)),
                   "train_seconds": round(time.time() - t1, 1)}
            res["out_of_fold"].append(row)
            print(json.dumps(row), flush=True)
        for kind in ([] if args.skip_heads else args.heads.split(",")):
            for loss in args.losses.split(","):
                for seed in map(int, args.oof_seeds.split(",")):
                    t1 = time.time()
                    E = np.zeros((len(keys), t_alt.shape[1]), np.float32)
                    for f in range(args.folds):
                        head = train_head(X, t_alt, text_ids, np.flatnonzero(fold != f), kind=kind, loss=loss,
                                          seed=seed, epochs=args.epochs, lr=args.lr)
                        E[fold == f] = embed(head, X[0][fold == f])
                    row = {"head": kind, "loss": loss, "seed": seed, "folds": args.folds, **measure(E),
                           "train_seconds": round(time.time() - t1, 1)}
                    res["out_of_fold"].append(row)
                    print(json.dumps(row), flush=True)
    if args.scratch_seeds:
        if args.scratch_folds and not args.folds:
            raise SystemExit("--scratch-folds needs --folds")
        res["scratch_cos"] = []
        for seed in map(int, args.scratch_seeds.split(",")):
            t1 = time.time()
            # trained and embedded on the 64 px crops of the pool (as clip_train), not the stored images
            if args.scratch_folds:
                E = np.zeros((len(keys), t_alt.shape[1]), np.float32)
                for f in range(args.folds):
                    E[fold == f] = train_scratch_cos(pairs.images, t_alt, text_ids, seed, args.threads,
                                                     np.flatnonzero(fold != f), np.flatnonzero(fold == f))
            else:
                E = train_scratch_cos(pairs.images, t_alt, text_ids, seed, args.threads)
            row = {"seed": seed, **({"folds": args.folds} if args.scratch_folds else {}), **measure(E),
                   "train_seconds": round(time.time() - t1, 1)}
            res["scratch_cos"].append(row)
            print(json.dumps(row), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    emit(res, args.out)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()

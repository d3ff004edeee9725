"""What the pipeline's tail does to a CLIP's retrieved images: retrieve (the bank's accepted concepts,
top k_retrieve) → dedup → leakage → ood (no head) → prune, with domain precision and the AUROC of the
OOD scores (non-food real images above food ones) after leakage. A fast stand-in for rerunning those
stages, for comparing CLIP / no-head recipes: dedup keeps one of each byte-identical stored JPEG group
(what the tiny SSCD at λ 0.9995 catches), leakage drops the pool's copies of the eval test images
(matched by source path and bytes), the blur delta is taken as 0 (no text detection), and prune is
`pas.curate.prune.select` on those images plus the run's synthetic ones.

    python benchmarks/offline_clip_tail.py models/clip [OTHER_CLIP_DIR ...] [--data data]
"""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pandas as pd


def main() -> None:
    from sklearn.metrics import roc_auc_score

    from pas.collect.retrieve import prompt_for
    from pas.curate.ood import OodParams, derive_generalized_concepts, encode_prompts, ood_scores
    from pas.curate.prune import PruneParams, select
    from pas.io.shards import iter_samples, list_shards
    from pas.models.clip import load_clip
    from pas.params import build, load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", nargs="+")
    ap.add_argument("--data", default="data", help="a run's data/ (pool, concepts, evalsets, generated)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load(args.params)
    op, pp = build(OodParams, params, "ood"), build(PruneParams, params, "prune")
    data = args.data.rstrip("/")
    idx = pd.read_parquet(f"{data}/pool/index.parquet")
    samples = {s.key: s for s in iter_samples(list_shards(f"{data}/pool"))}
    keys = idx["key"].tolist()
    images = [samples[k].pil() for k in keys]
    digest = np.array([hashlib.sha1(samples[k].image).hexdigest() for k in keys])
    food = idx["category"].str.match(r"food(/|$)").to_numpy()       # evaluation labels only
    test = pd.read_parquet(f"{data}/evalsets/clipart_food/test/index.parquet")
    leak = set(digest[idx["path"].isin(set("food/" + test["source_path"])).to_numpy()])
    gen = list(iter_samples(list_shards(f"{data}/generated")))
    bank = pd.read_parquet(f"{data}/concepts/bank.parquet")
    concepts = bank.loc[bank["accepted"], "concept"].astype(str).tolist()
    generalized = derive_generalized_concepts(params["domain"]["name"], params["domain"]["description"])
    for d in args.clips:
        clip = load_clip(d)
        E = clip.encode_images(images, batch_size=256)
        T = clip.encode_texts([prompt_for(c, params["retrieve"]["prompt_template"]) for c in concepts])
        top = np.unique(np.argsort(-(T @ E.T), axis=1, kind="stable")[:, :params["k_retrieve"]])
        _, first = np.unique(digest[top], return_index=True)
        dd = top[np.sort(first)]
        kept = dd[~np.isin(digest[dd], list(leak))]
        texts = encode_prompts(d, op, concepts, generalized, clip=clip).texts
        s = clip.logit_scale
        G = clip.encode_images([g.pil() for g in gen], batch_size=256)
        b, bp = ood_scores(E[kept], *texts.B, scale=s), ood_scores(E[kept], *texts.B_prime, scale=s)
        gb, gbp = ood_scores(G, *texts.B, scale=s), ood_scores(G, *texts.B_prime, scale=s)
        table = pd.DataFrame({"key": [keys[i] for i in kept] + [g.key for g in gen], "ood_b": np.r_[b, gb],
                              "ood_bprime": np.r_[bp, gbp], "ood_blur_delta": 0.0})
        res = select(table, pp)
        left = set(res.table["key"][~res.table["removed"]])
        final = [i for i in kept if keys[i] in left]
        r = {"retrieve": round(float(food[top].mean()), 4), "n_retrieve": len(top),
             "dedup": round(float(food[dd].mean()), 4), "leakage": round(float(food[kept].mean()), 4),
             "n_leakage": len(kept), "auroc_ood_b": round(float(roc_auc_score(~food[kept], b)), 3),
             "auroc_ood_bprime": round(float(roc_auc_score(~food[kept], bp)), 3),
             "final": round(float(food[final].mean()), 4), "n_final": len(final),
             "prune_removed": res.summary["n_removed"]}
        print(d, json.dumps(r), flush=True)


if __name__ == "__main__":
    main()

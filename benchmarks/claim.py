"""The paper's claim in miniature: pretraining on the curated dataset vs on a same-size random sample
of the whole pool vs random init, same architecture and recipe (params.yaml `pretrain:` / `eval:`),
over several seeds. Reads the outputs of a finished `dvc repro` (data/dataset, data/pool,
models/backbone_init, data/evalsets); writes benchmarks/results-claim.json (every run) and
metrics/claim.json (the means and spreads, with the md5 of the data/dataset it measured, as dvc.lock
records it: a DVC metrics file, so `dvc metrics show` / `dvc metrics diff` carry it; a test fails when
the dataset changed and the claim was not rerun).

    python benchmarks/claim.py --seeds 0 1 2

Not a DVC stage: six extra pretraining runs would double the offline profile's `dvc repro` time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def random_sample(pool_dir: Path, n: int, seed: int, out: Path) -> Path:
    """`n` pool images chosen uniformly with `seed`, written as webdataset shards + index."""
    import pandas as pd

    from pas.io.shards import ShardWriter, iter_samples, write_index

    keys = pd.read_parquet(pool_dir / "index.parquet")["key"].astype(str).to_numpy()
    chosen = set(np.random.default_rng(seed).choice(keys, size=n, replace=False).tolist())
    rows = []
    with ShardWriter(out, prefix="sample", maxcount=10_000) as w:
        for s in iter_samples(pool_dir):
            if s.key in chosen:
                rows.append({"key": s.key, "shard": w.write(s.key, s.image, {"key": s.key, "source": "real"},
                                                            ext=s.ext)})
    write_index(pd.DataFrame(rows), out)
    return out


def dataset_md5(lock_path: Path = Path("dvc.lock"), out: str = "data/dataset") -> str:
    """The md5 dvc.lock records for the final dataset (the prune stage's out)."""
    import yaml

    lock = yaml.safe_load(lock_path.read_text())
    for stage in lock["stages"].values():
        for o in stage.get("outs", []):
            if o["path"] == out:
                return o["md5"]
    raise SystemExit(f"{lock_path}: no out {out}; run `dvc repro` first")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="benchmarks/results-claim.json")
    ap.add_argument("--metrics", default="metrics/claim.json", help="the summary as a DVC metrics file")
    args = ap.parse_args()
    import pandas as pd

    from pas.params import build, load
    from pas.train.evaluate import EvalParams, evaluate
    from pas.train.pretrain import PretrainParams, pretrain

    params = load(args.params)
    pcfg, ecfg = build(PretrainParams, params, "pretrain"), build(EvalParams, params, "eval")
    n = len(pd.read_parquet("data/dataset/index.parquet"))
    runs: dict[str, list] = {"curated": [], "random_sample": [], "random_init": []}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = dataclasses.replace(pcfg, seed=seed)
            sample = random_sample(Path("data/pool"), n, seed, Path(tmp) / f"sample{seed}")
            for name, data in (("curated", Path("data/dataset")), ("random_sample", sample)):
                out = Path(tmp) / f"{name}{seed}"
                pretrain(cfg, data, "models/backbone_init", out, Path(tmp) / f"ckpt_{name}{seed}", progress=False)
                m = evaluate(dataclasses.replace(ecfg, seed=seed), out, "models/backbone_init", "data/evalsets",
                             progress=False)
                for set_name, r in m["sets"].items():
                    runs[name].append({"seed": seed, "set": set_name, **r["pretrained"]})
                    if name == "curated":
                        runs["random_init"].append({"seed": seed, "set": set_name, **r["baseline"]})
    summary = {}
    for name, rows in runs.items():
        df = pd.DataFrame(rows)
        summary[name] = {f"{k}_mean": round(float(df[k].mean()), 4) for k in ("knn_top1", "linear_top1")}
        summary[name].update({f"{k}_std": round(float(df[k].std(ddof=0)), 4) for k in ("knn_top1", "linear_top1")})
    res = {"n_images": n, "seeds": args.seeds, "summary": summary, "runs": runs,
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    from pas.jsonio import write_json

    write_json(args.metrics, {"n_images": n, "seeds": args.seeds, "dataset_md5": dataset_md5(), **summary})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

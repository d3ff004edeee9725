"""DVC stage `leakage`: drop dataset images that copy an eval test image (paper §4.1, App. D.1.4).

Reads the dedup output (keep-manifest + the SSCD descriptors it stored, so dataset images are not
embedded twice), the eval sets' test images (`<evalsets>/<name>/test/` shards written by the `evalsets`
stage, or any ImageFolder given with `--evalset NAME=DIR`) and the SSCD model folder; writes
`<out>/manifest.parquet` (key, kept, reason, score, nearest_key, evalset, n_matches, via, component,
component_leaks — one row per image dedup kept), `<out>/checked.parquet` (every dedup input against the
test sets), `<out>/test_descriptors.npy` + `<out>/test_keys.parquet`, and `metrics/leakage.json` (n_in,
n_kept, dropped by reason, by_source, dropped per eval set, test images per set, what the image and
component scopes drop).
Every dedup input is checked; `leakage.scope: component` drops whole dedup components with a leaking
member, `image` only kept images that leak themselves.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pas.curate.dedup import collapse_warning
from pas.curate.leakage import LeakageParams, by_component, leakage, load_dedup, resolve_evalsets, summary
from pas.engine import EngineConfig
from pas.io.manifest import write_metrics, write_parquet
from pas.params import build, load, run_stage, stage_parser

log = logging.getLogger("pas.stages.leakage")
CHUNK = 512


def _evalset_arg(s: str) -> tuple[str, str]:
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--evalset {s!r}: expected NAME=DIR")
    return name, path


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/leakage.json")
    ap.add_argument("--dedup", default="data/dedup", help="dedup output folder")
    ap.add_argument("--evalsets", default="data/evalsets", help="folder of eval sets (<name>/test/)")
    ap.add_argument("--evalset", action="append", type=_evalset_arg, default=[], metavar="NAME=DIR",
                    help="an extra eval test folder (webdataset shards or ImageFolder); repeatable")
    ap.add_argument("--sscd", default="models/sscd", help="SSCD folder from the models stage")
    ap.add_argument("--out", default="data/leakage")
    ap.add_argument("--cache", default="data/.cache/leakage",
                    help="scratch folder keeping finished test-descriptor chunks across killed runs (not a DVC "
                         "out); '' disables it")
    args = ap.parse_args(argv)
    p = build(LeakageParams, load(args.params), "leakage")

    from pas.curate.descriptors import descriptor_cache, set_descriptors, sscd_on_engine
    from pas.models.sscd import fingerprint

    t0 = time.time()
    # every collected image is checked, not only dedup's kept ones: a leak in a removed duplicate
    # reaches the dataset through its kept representative (leakage.scope)
    keys, sources, x, info, component, dedup_kept = load_dedup(Path(args.dedup))
    sha = fingerprint(args.sscd)
    if info.get("model_sha256") != sha:
        raise ValueError(f"{args.dedup}/descriptors.json was made by SSCD model {info.get('model_sha256')}, "
                         f"but {args.sscd} is {sha}: rerun dedup with this model")
    resize = info["resize"]
    if p.resize is not None and list(np.atleast_1d(p.resize)) != list(np.atleast_1d(resize)):
        raise ValueError(f"leakage.resize={p.resize} differs from the dedup descriptors' resize={resize}")
    sets = resolve_evalsets(args.evalsets if Path(args.evalsets).exists() or p.evalsets else None,
                            p.evalsets, p.split, dict(args.evalset))
    if not sets:
        log.warning("no eval sets found (%s, --evalset): nothing can leak, every image is kept", args.evalsets)
    engine = EngineConfig.from_env()        # with Ray this process only plans chunks and runs the kNN
    model, device = sscd_on_engine(args.sscd, p.device, engine)
    cache = descriptor_cache(args.cache, args.sscd, resize, p.batch_size, device, CHUNK, max_side=p.max_side)
    tkeys, tnames, xt, n_test = set_descriptors(sets, model, resize, p.batch_size, device, chunk=CHUNK,
                                                max_side=p.max_side, sscd_dir=args.sscd, engine=engine,
                                                cache=cache)
    if xt is None:
        xt = np.zeros((0, x.shape[1] if x.ndim == 2 and x.shape[1] else 512), np.float32)

    checked = leakage(keys, x, tkeys, tnames, xt, p.lambda_leak, p.k_leak, use_gpu=p.use_gpu)
    manifest = by_component(checked, component, dedup_kept, p.scope)
    metrics = summary(manifest, n_test, [s for s, k in zip(sources, dedup_kept) if k], checked=checked)
    metrics["scope"] = p.scope
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(manifest, out / "manifest.parquet")
    write_parquet(checked.assign(component=component, dedup_kept=dedup_kept), out / "checked.parquet")
    np.save(out / "test_descriptors.npy", xt)
    write_parquet(pd.DataFrame({"row": np.arange(len(tkeys), dtype=np.int64), "key": tkeys, "evalset": tnames}),
                  out / "test_keys.parquet", sort_by=None)
    write_metrics(args.metrics, metrics)
    log.info("leakage (%s scope): %d in, %d kept, %d dropped (%s; %d via a duplicate) against %d test "
             "images of %d sets in %.1fs", p.scope, metrics["n_in"], metrics["n_kept"],
             metrics["n_in"] - metrics["n_kept"],
             ", ".join(f"{k} {v}" for k, v in metrics["dropped_per_evalset"].items()) or "-",
             metrics["dropped"].get("leak_component", 0), len(tkeys), len(sets), time.time() - t0)
    warning = collapse_warning("leakage", metrics, "lambda_leak", p.lambda_leak)
    if warning:
        log.warning(warning)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))

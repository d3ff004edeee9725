"""DVC stage `leakage`: drop dataset images that copy an eval test image (paper §4.1, App. D.1.4).

Reads the dedup output (keep-manifest + the SSCD descriptors it stored, so dataset images are not
embedded twice), the eval sets' test images (`<evalsets>/<name>/test/` shards written by the `evalsets`
stage, or any ImageFolder given with `--evalset NAME=DIR`) and the SSCD model folder; writes
`<out>/manifest.parquet` (key, kept, reason, score, nearest_key, evalset, n_matches, via, component,
component_leaks — one row per image dedup kept), `<out>/checked.parquet` (every dedup input against the
test sets), `<out>/test_descriptors.npy` + `<out>/test_keys.parquet`, and `metrics/leakage.json` (n_in,
n_out, n_dropped, dropped per eval set, test images per set, what the image and component scopes drop).
Every dedup input is checked; `leakage.scope: component` drops whole dedup components with a leaking
member, `image` only kept images that leak themselves.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pas.curate.leakage import LeakageParams, by_component, leakage, resolve_evalsets, summary
from pas.engine import EngineConfig
from pas.io.manifest import read_parquet, write_metrics, write_parquet
from pas.params import build, load, run_stage

log = logging.getLogger("pas.stages.leakage")
CHUNK = 512


def load_dedup(dedup_dir: Path) -> tuple[list[str], list[str], np.ndarray, dict, np.ndarray, np.ndarray]:
    """Every dedup input (sorted by key): keys, sources, descriptors, the descriptors' provenance
    (descriptors.json), dedup component ids and dedup's kept flags."""
    for name in ("manifest.parquet", "keys.parquet", "descriptors.npy", "descriptors.json"):
        if not (dedup_dir / name).is_file():
            raise FileNotFoundError(f"{dedup_dir / name}: missing (run the dedup stage first)")
    manifest = read_parquet(dedup_dir / "manifest.parquet")
    order = read_parquet(dedup_dir / "keys.parquet")
    x = np.load(dedup_dir / "descriptors.npy")
    info = json.loads((dedup_dir / "descriptors.json").read_text())
    if len(order) != len(x):
        raise ValueError(f"{dedup_dir}: keys.parquet has {len(order)} rows but descriptors.npy {len(x)}")
    if "component" not in manifest.columns:
        raise ValueError(f"{dedup_dir}/manifest.parquet has no 'component' column: rerun dedup")
    m = manifest.assign(key=manifest["key"].astype(str)).set_index("key")
    src = order["source"] if "source" in order.columns else ["real"] * len(order)
    rows = sorted((str(k), int(r), str(s)) for r, k, s in zip(order["row"], order["key"], src))
    keys = [k for k, _, _ in rows]
    missing = [k for k in keys if k not in m.index]
    if missing:
        raise ValueError(f"{dedup_dir}: {len(missing)} descriptor key(s) not in manifest.parquet, e.g. {missing[0]!r}")
    sources = [s for _, _, s in rows]
    xs = x[[r for _, r, _ in rows]] if rows else x[:0]
    comp = m.loc[keys, "component"].to_numpy(np.int64) if rows else np.zeros(0, np.int64)
    kept = m.loc[keys, "kept"].to_numpy(bool) if rows else np.zeros(0, bool)
    return keys, sources, xs, info, comp, kept


def test_descriptors(sets: dict[str, Path], model, resize, p: LeakageParams, device: str, sscd_dir: str = "",
                     engine=None):
    """SSCD descriptors of every eval set's test images, set by set, in stored order.

    Each set is cut into chunks of CHUNK images (`pas.data.chunks`, no decoding) and each chunk is one
    `descriptors` call on `engine` (PAS_ENGINE; Ray actors load SSCD from `sscd_dir`): the chunks,
    hence the batches and bytes, are the same on either engine. Returns (keys, set names, descriptors
    or None, test images per set)."""
    from pas.data.chunks import plan_chunks
    from pas.engine import map_shards
    from pas.models.sscd import ChunkDescriptors

    items, owner = [], []
    for name, d in sets.items():
        for item in plan_chunks(d, CHUNK):
            items.append(item)
            owner.append(name)
    parts = map_shards(ChunkDescriptors(sscd_dir, resize, p.batch_size, device, max_side=p.max_side, model=model),
                       items, config=engine, desc="sscd test chunks")
    keys, names, xs = [], [], []
    n_test = {name: 0 for name in sets}
    for name, (part_keys, x) in zip(owner, parts):
        keys += part_keys
        names += [name] * len(part_keys)
        n_test[name] += len(part_keys)
        if len(part_keys):
            xs.append(x)
    for name, n in n_test.items():
        if n == 0:
            log.warning("eval set %s: no test images in %s", name, sets[name])
    return keys, names, (np.concatenate(xs) if xs else None), n_test


def _evalset_arg(s: str) -> tuple[str, str]:
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--evalset {s!r}: expected NAME=DIR")
    return name, path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dedup", default="data/dedup", help="dedup output folder")
    ap.add_argument("--evalsets", default="data/evalsets", help="folder of eval sets (<name>/test/)")
    ap.add_argument("--evalset", action="append", type=_evalset_arg, default=[], metavar="NAME=DIR",
                    help="an extra eval test folder (webdataset shards or ImageFolder); repeatable")
    ap.add_argument("--sscd", default="models/sscd", help="SSCD folder from the models stage")
    ap.add_argument("--out", default="data/leakage")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics/leakage.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = build(LeakageParams, load(args.params), "leakage")

    from pas.models.sscd import fingerprint, load_sscd, resolve_device

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
    engine = EngineConfig.from_env()
    # with Ray the actors load SSCD and resolve `device: auto` on their own node (the driver may have
    # no GPU); this process only plans chunks and runs the kNN
    device = resolve_device(p.device) if engine.engine == "local" else p.device
    model = load_sscd(args.sscd, device=device) if engine.engine == "local" else None
    tkeys, tnames, xt, n_test = test_descriptors(sets, model, resize, p, device, sscd_dir=args.sscd,
                                                 engine=engine)
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
             "images of %d sets in %.1fs", p.scope, metrics["n_in"], metrics["n_out"], metrics["n_dropped"],
             ", ".join(f"{k} {v}" for k, v in metrics["dropped_per_evalset"].items()) or "-",
             metrics["dropped_leak_component"], len(tkeys), len(sets), time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))

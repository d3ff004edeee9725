"""DVC stages `models@<family>` and `pool_models@<family>` (clip, sscd): resolve the family's spec in
params.yaml to `models/<family>/`.

Real specs download once (network); tiny specs are built offline from a seed; `trained` specs (the
offline CLIP and SSCD) are trained on the image pool of `pool.source`. Either way the
folder is then loaded by the real loaders (open_clip, TorchScript, diffusers, transformers, timm).
Before any download, every `kind: hub` repository of `models:` (all families) is checked on the Hub:
a missing repository, revision or variant, or a gated one without access (HF_TOKEN), fails the first
models stage that runs, in one line, before gigabytes of other models arrive.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

from pas.io.manifest import write_metrics
from pas.models.files import fingerprint_dir
from pas.models.hub import check_access
from pas.models.specs import FAMILIES, ModelsParams, hub_repos, resolve
from pas.params import build, load, run_stage, stage_parser

log = logging.getLogger("pas.models")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("family", choices=FAMILIES)
    ap.add_argument("out", help="output folder, e.g. models/clip")
    ap.add_argument("--metrics", help="metrics JSON (default metrics/models/<family>.json)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    params = load(args.params)
    p = build(ModelsParams, params, "models")
    spec = getattr(p, args.family)
    t0 = time.time()
    repos = hub_repos(dataclasses.asdict(p))
    if repos:
        check_access(repos)
    out = resolve(args.family, spec, args.out, params=params)   # `trained` specs read its pool
    secs = time.time() - t0
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("models: %s (%s) -> %s, %.1f MB in %.1fs", args.family,
             spec.get("kind", "named"), out, size / 1e6, secs)
    # one metrics file per family: the foreach stages run independently
    write_metrics(args.metrics or f"metrics/models/{args.family}.json", {"family": args.family, "bytes": size, "seconds": round(secs, 1),
                         "fingerprint": fingerprint_dir(out)[:16]})
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))

"""The `pas` command (also `python -m pas`): look at a project before and after `dvc repro`.

  pas check    validate params.yaml, the model specs and the inputs a run reads; one line per problem
               (and a note when installed packages differ from requirements.lock)
  pas summary  the run's headline figures (metrics/summary.json) as the run printed them
  pas report   (re)write the run report, one offline HTML page (default data/report/index.html)

Run from the project root (where params.yaml and dvc.yaml are). Exit status: 0 fine, 2 a problem the
user fixes (params, missing inputs), 1 a pool entry that stops DVC from hashing the pool.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pas.params import ParamsError, check_dvc_yaml, load, outside_repo_deps, setup_logging


def _inputs(params: dict) -> list[str]:
    """Problems with what a run reads from disk: the pool folder, eval set folders, local model paths."""
    out = []
    pool = params.get("pool") or {}
    retrieve = params.get("retrieve") or {}
    if retrieve.get("backend", "pool") == "pool" and pool.get("source") is not None:
        if not Path(str(pool["source"])).is_dir():
            out.append(f"pool.source={pool['source']!r}: no such folder")
    ev = params.get("eval") or {}
    for i, spec in enumerate(ev.get("sets") or []):
        path = Path(str(spec.get("path")))
        if ev.get("root") is not None and not path.is_absolute():
            path = Path(str(ev["root"])) / path
        if not path.exists():
            out.append(f"eval.sets[{i}] ({spec.get('name')}): {path}: no such folder")
    for family, spec in sorted((params.get("models") or {}).items()):
        if isinstance(spec, dict) and spec.get("kind") == "local" and not Path(str(spec["path"])).exists():
            out.append(f"models.{family}.path={spec['path']!r}: no such file or folder")
    clipn = (params.get("models") or {}).get("clipn") or {}
    if clipn.get("kind") == "clipn":      # its base and checkpoint paths (a url is fetched by models@clipn)
        base, ck = clipn.get("base") or {}, clipn.get("checkpoint") or {}
        if base.get("kind") == "local" and not Path(str(base["path"])).exists():
            out.append(f"models.clipn.base.path={base['path']!r}: no such file or folder")
        if "path" in ck and not Path(str(ck["path"])).expanduser().is_file():
            out.append(f"models.clipn.checkpoint.path={ck['path']!r}: no such file")
    return out


def threshold_notes(params: dict) -> list[str]:
    """λ_dup / λ_leak below what the random-init tiny SSCD gives unrelated images
    (benchmarks/RESULTS-dedup.md): the run would keep a handful of images."""
    from pas.curate.dedup import RANDOM_SSCD_MIN_LAMBDA

    sscd = (params.get("models") or {}).get("sscd") or {}
    if not isinstance(sscd, dict) or sscd.get("kind") != "tiny":
        return []
    return [f"{name}={params[name]:g} with models.sscd kind tiny (random-init): unrelated images score "
            f"0.92-0.999, so {stage} will keep almost nothing; use >= {RANDOM_SSCD_MIN_LAMBDA:g} (the default 0.9995)"
            for name, stage in (("lambda_dup", "dedup"), ("lambda_leak", "leakage"))
            if isinstance(params.get(name), (int, float)) and params[name] < RANDOM_SSCD_MIN_LAMBDA]


def lock_drift(lock: Path) -> list[tuple[str, str, str]]:
    """(name, locked, installed) for each package pinned `name==version` in `lock` (scripts/lock.py's
    format) whose installed version differs; packages not installed (another stack's) are skipped."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for line in lock.read_text().splitlines():
        spec = line.split("\\")[0].split(";")[0].strip()
        if spec.startswith("#") or "==" not in spec:
            continue
        name, want = (x.strip() for x in spec.split("==", 1))
        try:
            have = version(name)
        except PackageNotFoundError:
            continue
        # the local label is the build (`+cpu`: PyTorch's CPU wheels, which scripts/install.sh picks)
        if have.split("+")[0] != want.split("+")[0]:
            out.append((name, want, have))
    return out


def check(args: argparse.Namespace) -> int:
    try:
        params = load(args.params)
        if Path(args.dvc_yaml).is_file():
            check_dvc_yaml(params, args.dvc_yaml)      # what the `params` stage checks
    except (ParamsError, OSError) as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    problems = _inputs(params)
    rc = 2 if problems else 0
    root = Path(args.dvc_yaml).resolve().parent
    for line in [*outside_repo_deps(params, root), *threshold_notes(params)]:
        print(f"note: {line}")
    if (root / "requirements.lock").is_file():
        # the bytes dvc.lock records come from the locked stack (parquet files even name the pandas and
        # pyarrow that wrote them): another install reruns to other bytes
        drift = lock_drift(root / "requirements.lock")
        if drift:
            shown = ", ".join(f"{n} {have} (locked {want})" for n, want, have in drift[:5])
            more = f" and {len(drift) - 5} more" if len(drift) > 5 else ""
            print(f"note: installed {shown}{more}: outputs will not have dvc.lock's bytes; "
                  f"install with scripts/install.sh (requirements.lock)")
    pool = params.get("pool") or {}
    if not problems and (params.get("retrieve") or {}).get("backend", "pool") == "pool" \
            and pool.get("format", "folder") == "folder":
        from pas.data.pool import DVC_BLOCKERS, PoolParams, check_source
        from pas.params import build

        bad = check_source(build(PoolParams, params, section="pool"))
        for b in bad:
            print(f"pool.source: {b['reason']}: {b['path']} {b['detail']}".rstrip())
        if any(b["reason"] in DVC_BLOCKERS for b in bad):
            problems.append(f"pool.source has entries that stop DVC from hashing it ({', '.join(DVC_BLOCKERS)})")
            rc = 1
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"{args.params}: ok (params valid, inputs present)")
    return rc


def summary(args: argparse.Namespace) -> int:
    from pas.io.manifest import read_metrics
    from pas.summary import summary_text

    path = Path(args.metrics)
    if not path.is_file():
        print(f"{path}: no summary yet (run `dvc repro`, or `dvc pull` a finished run)", file=sys.stderr)
        return 2
    report = Path(args.report)
    print(summary_text(read_metrics(path), args.dataset, str(report) if report.is_file() else None))
    return 0


def report(args: argparse.Namespace) -> int:
    from pas.report import build_report

    try:
        res = build_report(".", args.out, params=load(args.params))
    except (ParamsError, ValueError, OSError) as e:
        print(f"report error: {e}", file=sys.stderr)
        return 2
    missing = f" (missing inputs: {', '.join(sorted(res.missing))})" if res.missing else ""
    print(f"{res.index}: {res.n_images} thumbnails, {len(res.figures)} figures{missing}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pas", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate params.yaml, model specs and inputs before a run")
    c.add_argument("--params", default="params.yaml")
    c.add_argument("--dvc-yaml", default="dvc.yaml")
    c.set_defaults(func=check)
    s = sub.add_parser("summary", help="print the run's headline figures")
    s.add_argument("--metrics", default="metrics/summary.json")
    s.add_argument("--dataset", default="data/dataset")
    s.add_argument("--report", default="data/report/index.html")
    s.set_defaults(func=summary)
    r = sub.add_parser("report", help="write the run report (an offline HTML page) from the run's outputs")
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--out", default="data/report")
    r.set_defaults(func=report)
    args = ap.parse_args(argv)
    os.environ.setdefault("PAS_LOG_LEVEL", "WARNING")
    setup_logging()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: full worst-first Pareto ranking (`pas.curate.pareto.worst_first_ranks`) vs moocore.

N points x 3 objectives, three shapes:
  uniform     i.i.d. U(0, 1) scores (few, large fronts)
  correlated  base ~ U(0, 1) plus N(0, 0.05) noise per objective (many small fronts)
  rounded     U(0, 1) rounded to 2 decimals (heavy ties and duplicate rows)
  ood         benchmarks/scale.py's prune scores: B' = B + N(0, 0.1) clipped to [0, 1], 80% of blur
              deltas exactly 0 (the clipped rows with delta 0 are chains of one-row fronts: F grows
              with N, and they tie in y)

`moocore.pareto_rank(points, maximise=True)` runs on the same array in the same process and its ranks
must equal ours exactly (both number fronts from 0 = the set no other point dominates under
maximisation; the convention is checked on a hand-made case first). Ours is timed after a numba
warm-up, best of --repeats; moocore best of --repeats up to 200k rows, once at 1M (it takes tens of
seconds there). The `sweep only` column times `method="sweep"` (the default `auto` takes the grid
path for the rounded shape). `--baseline REV` also times `worst_first_ranks` of
src/pas/curate/pareto.py as it was at git revision REV, in the same process on the same arrays (its
ranks must be equal): old vs new side by side.

    python benchmarks/pareto.py --sizes 100000 1000000 --out benchmarks/RESULTS-pareto.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from _common import emit
from pas.curate.pareto import worst_first_ranks

SHAPES = ("uniform", "correlated", "rounded", "ood")


def make(shape: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if shape == "uniform":
        return rng.random((n, 3))
    if shape == "correlated":
        return rng.random((n, 1)) + 0.05 * rng.standard_normal((n, 3))
    if shape == "rounded":
        return np.round(rng.random((n, 3)), 2)
    if shape == "ood":
        base = rng.random(n)
        return np.column_stack([base, np.clip(base + 0.1 * rng.standard_normal(n), 0, 1),
                                np.where(rng.random(n) < 0.2, 0.2 * rng.standard_normal(n), 0.0)])
    raise ValueError(shape)


def check_convention() -> None:
    """moocore with maximise=True numbers fronts like us: 0 = not dominated under maximisation."""
    import moocore

    pts = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0],
                    [0.5, 0.5, 0.5]])
    expected = np.array([0, 2, 0, 0, 1])
    assert (worst_first_ranks(pts) == expected).all()
    got = np.asarray(moocore.pareto_rank(pts, maximise=True))
    assert (got == expected).all(), f"moocore convention changed: {got}"


def load_baseline(rev: str, where: str):
    """`worst_first_ranks` of src/pas/curate/pareto.py at git revision `rev` (a copy under `where`, so
    numba caches its compiled code there)."""
    import importlib.util
    import subprocess
    from pathlib import Path

    src = subprocess.run(["git", "show", f"{rev}:src/pas/curate/pareto.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(where) / f"pareto_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"pareto_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.worst_first_ranks


def best_time(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    """Best (wall, CPU) seconds over `repeats` calls; CPU time is what a shared machine's load hides."""
    best, out = (float("inf"), float("inf")), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best[0], best[1], out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-moocore", action="store_true", help="time ours only")
    ap.add_argument("--out", help="append the markdown table to this file")
    ap.add_argument("--baseline", metavar="REV", help="also time pareto.py as of this git revision")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    worst_first_ranks(make("rounded", 1000, 1))       # numba compile / cache load: sweep...
    worst_first_ranks(make("rounded", 1000, 1), method="grid")                       # ...and grid
    warmup = time.perf_counter() - t0
    old = None
    if args.baseline:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="pareto-baseline-")
        old = load_baseline(args.baseline, tmp.name)
        old(make("rounded", 1000, 1), method="sweep")   # its warm-up
    if not args.no_moocore:
        import moocore
        check_convention()

    rows = []
    for n in args.sizes:
        for shape in args.shapes:
            pts = make(shape, n, args.seed)
            t_ours, c_ours, ours = best_time(lambda: worst_first_ranks(pts), args.repeats)
            t_sweep, _, sweep = best_time(lambda: worst_first_ranks(pts, method="sweep"), args.repeats)
            assert (sweep == ours).all()
            if old is not None:
                t_old, c_old, ranks_old = best_time(lambda: old(pts), args.repeats)
                if not (ranks_old == ours).all():
                    raise SystemExit(f"MISMATCH with {args.baseline}: n={n} shape={shape}")
            line = {"n": n, "shape": shape, "fronts": int(ours.max()) + 1, "ours_s": t_ours,
                    "ours_cpu": c_ours, "sweep_s": t_sweep, "load": os.getloadavg()[0],
                    "distinct": len(np.unique(pts, axis=0)) if shape == "rounded" else n}
            if old is not None:
                line["old_s"], line["old_cpu"] = t_old, c_old
            if not args.no_moocore:
                # best of --repeats where a run is short (≤ 200k rows), once at 1M (10-35 s a run)
                reps = args.repeats if n <= 200_000 else 1
                t_ref, c_ref, ref = best_time(lambda: moocore.pareto_rank(pts, maximise=True), reps)
                line["moocore_s"], line["moocore_cpu"] = t_ref, c_ref
                line["agree"] = bool((ref == ours).all())
                if not line["agree"]:
                    raise SystemExit(f"MISMATCH n={n} shape={shape}: "
                                     f"{int((ref != ours).sum())} ranks differ")
            rows.append(line)
            print(line, flush=True)

    head = ("| N | shape | distinct rows | fronts | ours wall (s) | ours CPU (s) | (sweep only, wall) "
            "| moocore wall (s) | moocore CPU (s) | speed-up wall | speed-up CPU | ranks equal | load avg |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        m, mc = r.get("moocore_s"), r.get("moocore_cpu")
        cells = ["", "", "", ""] if m is None else [
            f"{m:.3f}", f"{mc:.3f}", f"{m / r['ours_s']:.1f}x", f"{mc / max(r['ours_cpu'], 1e-9):.1f}x"]
        lines.append(f"| {r['n']:,} | {r['shape']} | {r['distinct']:,} | {r['fronts']:,} | "
                     f"{r['ours_s']:.4f} | {r['ours_cpu']:.4f} | {r['sweep_s']:.4f} | {' | '.join(cells)} | "
                     f"{r.get('agree', '')} | {r['load']:.1f} |")
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
           f"numba warm-up/compile {warmup:.1f} s, ours best of {args.repeats}, moocore best of "
           f"{args.repeats} up to 200k rows, else once")
    if old is not None:
        lines += ["", f"| N | shape | fronts | {args.baseline} wall (s) | {args.baseline} CPU (s) | now wall (s) "
                  "| now CPU (s) | speed-up CPU | load avg |", "|" + "---|" * 9]
        lines += [f"| {r['n']:,} | {r['shape']} | {r['fronts']:,} | {r['old_s']:.4f} | {r['old_cpu']:.4f} | "
                  f"{r['ours_s']:.4f} | {r['ours_cpu']:.4f} | {r['old_cpu'] / max(r['ours_cpu'], 1e-9):.1f}x | "
                  f"{r['load']:.1f} |" for r in rows]
    table = "\n".join(lines) + f"\n\n({env})\n"
    emit(table, args.out, append=True)


if __name__ == "__main__":
    main()

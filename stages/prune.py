"""DVC stage `prune`: Pareto-front pruning of the OOD scores (paper §3.3) and export of the final dataset.

Reads data/ood/scores.parquet and the retrieved + generated shards; writes data/dataset/ (webdataset
shards of the kept images in key order + index.parquet), data/prune/ (ranks.parquet, the peel curves
peel.csv / peel_binned.csv / knees.csv for `dvc plots`, peel.png, removed_samples.png),
metrics/prune.json and the dataset funnel metrics/dataset.json.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from pas.curate.card import dataset_card
from pas.curate.export import export_dataset, read_takedown
from pas.curate.prune import METRICS, PruneParams, dataset_funnel, sample_grid_keys, select
from pas.curate.prune_plots import plot_peel, sample_grid, score_caption
from pas.io.manifest import read_metrics, read_parquet, selection_stats, write_metrics, write_parquet
from pas.params import ParamsError, build, load, run_stage, stage_parser
from pas.summary import FUNNEL

log = logging.getLogger("pas.stages.prune")


def _write_csv(df, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, float_format="%.6g", lineterminator="\n")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/prune.json")
    ap.add_argument("--scores", default="data/ood/scores.parquet", help="ood scores parquet")
    ap.add_argument("--images", nargs="+", default=["data/retrieved", "data/generated"],
                    help="webdataset shard folders holding the scored images")
    ap.add_argument("--metrics-dir", default="metrics", help="other stages' metrics for the funnel")
    ap.add_argument("--out", default="data/dataset", help="final dataset folder")
    ap.add_argument("--prune-dir", default="data/prune", help="ranks, peel curves and figures")
    ap.add_argument("--dataset-metrics", default="metrics/dataset.json")
    ap.add_argument("--concepts-metrics", default="metrics/concepts.json",
                    help="|B| and coverage for the dataset card (concepts stage)")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    pdir = Path(args.prune_dir)
    try:
        params = load(args.params)
        p = build(PruneParams, params, section="prune")
        takedown = read_takedown(p.takedown)
        if not Path(args.scores).is_file():
            raise FileNotFoundError(f"{args.scores}: no such scores file (run the ood stage)")
        for d in args.images:
            if not Path(d).exists():
                raise FileNotFoundError(f"{d}: no such image folder")
        scores = read_parquet(args.scores)
        if not len(scores):             # nothing to prune is an upstream failure, not an empty dataset
            raise ValueError(f"{args.scores}: no scored images (the ood stage scored none)")
        try:
            result = select(scores, p)
        except ValueError as e:
            raise ValueError(f"{args.scores}: {e}") from None
        t_rank = time.perf_counter() - t0
        grid = sample_grid_keys(result.table, p.sample_fronts, p.sample_per_front, p.seed)
        rep = export_dataset(args.images, result.table, args.out, maxcount=p.shard_size,
                             buffer_bytes=p.sort_buffer_mb << 20,
                             sample_keys=[k for ks in grid.values() for k in ks],
                             takedown=takedown, progress=not args.no_progress)
    except (ParamsError, ValueError, FileNotFoundError) as e:
        log.error("prune failed: %s", e)
        return 2

    write_parquet(result.table, pdir / "ranks.parquet")
    _write_csv(result.curve, pdir / "peel.csv")
    _write_csv(result.binned, pdir / "peel_binned.csv")
    knee_rows = [{"metric": m, "removed": k.x, "value": k.y} for m, k in result.knees.items()
                 if k.x is not None]
    import pandas as pd

    _write_csv(pd.DataFrame(knee_rows, columns=["metric", "removed", "value"]), pdir / "knees.csv")
    s = result.summary
    plot_peel(result.curve["removed"].to_numpy(), {m: result.curve[m].to_numpy() for m in METRICS},
              result.binned["removed"].to_numpy(), {m: result.binned[m].to_numpy() for m in METRICS},
              {m: (k.x, k.y) for m, k in result.knees.items()},
              s["stop_x"] if s["n_in"] else None, pdir / "peel.png",
              title=f"Pareto peel: {s['n_in']:,} images, {s['fronts']:,} fronts; stop ({s['stop_reason']}) "
                    f"after {s['stop_x']:,} removed")
    rows = []
    scores = result.table.set_index("key")[list(METRICS)]
    for n, keys in grid.items():
        removed = bool(result.table.loc[result.table["front"] == n - 1, "removed"].all())
        size = int((result.table["front"] == n - 1).sum())
        rows.append((f"Pareto {n} ({size:,} images, {'removed' if removed else 'kept'})",
                     [(rep.thumbs[k], score_caption(**scores.loc[k])) for k in keys]))
    sample_grid(rows, pdir / "removed_samples.png")

    metrics = {k: v for k, v in s.items() if v is not None and k not in ("n_in", "n_kept", "n_removed")}
    metrics = {**selection_stats(rep.sources_scored, rep.sources_kept,
                                 {"pareto": s["n_removed"], "takedown": rep.n_takedown}), **metrics}
    metrics.update({
        "n_shards": int(rep.index["shard"].nunique()) if len(rep.index) else 0,
        "n_sort_runs": rep.n_runs,
        "seconds_rank_and_stop": t_rank,
        "seconds": time.perf_counter() - t0,
    })
    # sorted runs follow prune.sort_buffer_mb, a machine knob that is no DVC param: run log only
    write_metrics(args.metrics, metrics, run_keys=("n_sort_runs",))
    funnel = dataset_funnel(args.metrics_dir, rep.sources_in, rep.sources_scored, rep.sources_kept)
    write_metrics(args.dataset_metrics, funnel)
    concepts = read_metrics(args.concepts_metrics) if Path(args.concepts_metrics).is_file() else None
    (Path(args.out) / "README.md").write_text(dataset_card(
        domain=params.get("domain") or {}, funnel=funnel, prune=s, concepts=concepts, license=p.license))
    # the same funnel as rows, for `dvc plots` (a bar per stage)
    order = [s for s in FUNNEL if s in funnel]
    _write_csv(pd.DataFrame([{"step": i, "stage": s, "images": funnel[s]["n"],
                              "real": funnel[s].get("real"), "synthetic": funnel[s].get("synthetic")}
                             for i, s in enumerate(order)]), pdir / "funnel.csv")
    log.info("prune: %d images, %d fronts, stop %s (%s) after %d fronts -> kept %d, removed %d "
             "(knees %s); %d shards in %s, %.1f s", s["n_in"], s["fronts"], s["stop"], s["stop_reason"],
             s["fronts_removed"], metrics["n_kept"], metrics["n_in"] - metrics["n_kept"], s["knee_x"] or "-",
             metrics["n_shards"], args.out, metrics["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))

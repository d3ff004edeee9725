"""The run report: one static HTML page of a run's outputs, `data/report/index.html`, that opens offline.

In pipeline order: the headline figures; the dataset funnel (real / synthetic after each stage); the
concept bank with its λ1/λ2 stopping; retrieved and generated images per concept; dedup groups and the
near-misses just under λ_dup; leakage pairs beside the test image they matched; the OOD extremes with
their detected text boxes; the Pareto peel with its knees and sample fronts; the final dataset; the
evaluation table. Every thumbnail's border says what became of the image (final dataset, or the stage
that removed it).

Static and self-contained: thumbnails are inline base64 JPEGs, figures are PNG files beside index.html
(relative links, drawn with `pas.plots`), no script, no network. Bounded: only the images shown are
read (found through each folder's index.parquet, read with a seek), a fixed number per section, chosen
by score order or by `seed`. A section whose inputs are missing says which file is missing, so a
partial run still gets a report; an input that exists but cannot be read is an error naming it.
Same inputs + params → same bytes.

Entry point: `build_report(root, out_dir)` (the `report` DVC stage and `pas report`).
"""

from __future__ import annotations

import html
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from pas.concepts import load_bank
from pas.params import check_range, check_seed
from pas.summary import FUNNEL

log = logging.getLogger(__name__)

SCORES = ("ood_b", "ood_bprime", "ood_blur_delta")   # the three OOD scores (pas.curate.ood)
FIGURES = ("funnel.png", "concepts.png", "peel.png")  # files written beside index.html


@dataclass(frozen=True)
class ReportParams:
    """params.yaml section `report`: how much of each stage the report shows (λs and seed: top level)."""

    concepts: int = 8             # concepts shown with their retrieved and generated images (seeded)
    per_concept: int = 6          # images per concept and source, and per Pareto front row
    dedup_groups: int = 8         # largest duplicate groups
    per_group: int = 8            # images per duplicate group
    pairs: int = 8                # pairs per list: near-misses under λ_dup, leaks, near-misses under λ_leak
    ood_extremes: int = 6         # images at each end of each OOD score
    fronts: tuple[int, ...] = (1, 2, 3, 10, 100)   # "Pareto n" rows (1 = removed first), those that exist
    dataset_samples: int = 32     # thumbnails of the final dataset (seeded)
    table_rows: int = 100         # concept-bank rows listed (accepted first)
    thumb: int = 128              # thumbnail side (px)
    lambda_1: float = 0.01
    lambda_2: float = 0.01
    lambda_dup: float = 0.6
    lambda_leak: float = 0.45
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("concepts", "per_concept", "dedup_groups", "per_group", "pairs", "ood_extremes",
                     "dataset_samples", "table_rows"):
            check_range(name, getattr(self, name), 0, 1000, lo_open=False, hi_open=False)
        check_range("thumb", self.thumb, 16, 512, lo_open=False, hi_open=False)
        for n in self.fronts:
            check_range("fronts[]", n, 1, None, lo_open=False)
        check_seed("seed", self.seed)


@dataclass(frozen=True)
class Inputs:
    """Where the report reads, relative to the run's root (the `report` stage's deps)."""

    params: str = "params.yaml"
    concepts: str = "data/concepts"            # bank.parquet, history.json
    retrieved: str = "data/retrieved"          # shards + index.parquet, hits.parquet
    generated: str = "data/generated"
    dedup: str = "data/dedup"                  # manifest.parquet, keys.parquet, descriptors.npy
    leakage: str = "data/leakage"              # checked.parquet, manifest.parquet
    evalsets: str = "data/evalsets"            # <set>/<split>/ test shards
    ood: str = "data/ood/scores.parquet"
    prune: str = "data/prune"                  # ranks.parquet, knees.csv, peel.png
    dataset: str = "data/dataset"
    metrics: str = "metrics"                   # the METRICS files below

    METRICS: ClassVar[tuple[str, ...]] = ("summary", "dataset", "concepts", "dedup", "leakage", "ood", "prune",
                                          "precision", "pretrain", "eval")

    def files(self) -> list[str]:
        """Every path the report reads (files, or folders of shards): the `report` stage's data deps."""
        return [f"{self.concepts}/bank.parquet", f"{self.concepts}/history.json", self.retrieved, self.generated,
                f"{self.dedup}/manifest.parquet", f"{self.dedup}/keys.parquet", f"{self.dedup}/descriptors.npy",
                f"{self.leakage}/checked.parquet", f"{self.leakage}/manifest.parquet", self.evalsets, self.ood,
                f"{self.prune}/ranks.parquet", f"{self.prune}/knees.csv", f"{self.prune}/peel.png", self.dataset,
                *(f"{self.metrics}/{m}.json" for m in self.METRICS)]


@dataclass
class ReportResult:
    index: Path                                          # index.html
    figures: list[Path] = field(default_factory=list)    # PNGs beside it
    missing: dict[str, str] = field(default_factory=dict)   # section -> the missing input
    n_images: int = 0                                    # thumbnails embedded


class _Missing(Exception):
    """A section's input is absent (its stage has not run): the section says so instead."""


# ---------------------------------------------------------------------------------------------
# reading


def _parquet(path: Path, columns: Sequence[str] | None = None, optional: bool = False):
    """The table at `path`; absent: _Missing, or None where the input is `optional`."""
    import pyarrow.parquet as pq

    if not path.is_file():
        if optional:
            return None
        raise _Missing(path)
    try:
        return pq.read_table(path, columns=list(columns) if columns else None).to_pandas()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types; name the file
        raise ValueError(f"{path}: unreadable parquet ({e})") from None


def _json(path: Path) -> Any:
    if not path.is_file():
        raise _Missing(path)
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_images(dirs: Iterable[str | Path], keys: Iterable[str]) -> dict[str, bytes]:
    """Encoded image bytes of `keys` from webdataset folders: each folder's index.parquet says which
    shard holds a key, its tar headers where (`pas.io.shards.sample_table`); only those members are
    read. Keys found in no folder are left out."""
    from pas.io.shards import INDEX_NAME, iter_samples, read_samples, sample_table

    want, out = set(keys), {}
    for d in dirs:
        d = Path(d)
        if not want or not (d / INDEX_NAME).is_file():
            continue
        idx = _parquet(d / INDEX_NAME, ["key", "shard"])
        idx = idx[idx["key"].isin(want)]
        for shard, rows in sorted(idx.groupby("shard")):
            path = d / shard
            table = sample_table(path)
            pos = {k: i for i, k in enumerate(table.keys)} if table is not None else {}
            for key in sorted(rows["key"]):
                if key in pos:          # uncompressed: seek to the sample
                    s = next(read_samples(path, pos[key], pos[key] + 1))
                    out[key] = s.image
                    want.discard(key)
            if table is None:           # compressed: one pass
                for s in iter_samples(path):
                    if s.key in want:
                        out[s.key] = s.image
                        want.discard(s.key)
    return out


def _pick(items: Sequence, n: int, seed: int, stream: int) -> list:
    """`n` of `items` (kept in their order), a seeded choice; `stream` separates the sections."""
    if n >= len(items):
        return list(items)
    rng = np.random.default_rng([seed, stream])
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


# ---------------------------------------------------------------------------------------------
# HTML pieces

_CSS = """
body{font-family:"DejaVu Sans",Verdana,sans-serif;margin:0 auto;max-width:1500px;padding:0 1em 2em;
 background:#f6f6f6;color:#222;font-size:14px}
nav{position:sticky;top:0;background:#f6f6f6;padding:.4em 0;border-bottom:1px solid #ddd}
nav a{margin-right:1em}
section{background:#fff;border:1px solid #ddd;padding:.2em 1em 1em;margin:1em 0}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #eee} h3{font-size:15px;margin:.8em 0 .3em}
table{border-collapse:collapse;font-size:13px;margin:.4em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;gap:10px;align-items:flex-start;margin:8px 0}
.label{width:130px;flex:none;font-size:12px;overflow-wrap:anywhere}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}
.pair{padding:3px;border:1px dashed #ccc;font-size:12px} .pair>div{display:flex;gap:2px}
.scroll{max-height:420px;overflow-y:auto;display:inline-block}
figure{margin:0;width:138px;font-size:11px;text-align:center;overflow-wrap:anywhere}
figure img{width:128px;height:128px;object-fit:contain;background:#fff;border:5px solid #bbb}
figure.final img{border-color:#2ca02c} figure.dedup img{border-color:#7f7f7f}
figure.leakage img{border-color:#9467bd} figure.prune img{border-color:#d62728}
figure.takedown img{border-color:#8c564b} figure.test img{border-color:#17becf}
.legend span{display:inline-block;margin-right:1em;padding-left:6px;border-left:14px solid}
.note{color:#666;font-style:italic}
img.plot{max-width:100%;height:auto;border:1px solid #eee}
"""

# image fate -> legend text (the figure's CSS class)
FATES = {"final": "in the final dataset", "dedup": "removed by dedup", "leakage": "removed by leakage",
         "prune": "removed by prune", "takedown": "taken down", "test": "eval test image",
         "": "not traced"}
_FATE_COLOURS = {"final": "#2ca02c", "dedup": "#7f7f7f", "leakage": "#9467bd", "prune": "#d62728",
                 "takedown": "#8c564b", "test": "#17becf", "": "#bbbbbb"}


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _num(v: Any) -> str:
    if v is None:
        return "–"
    if not _is_number(v):
        return esc(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return "–" if not np.isfinite(v) else f"{float(v):.3f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; numbers right-aligned, everything escaped."""
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = (f"<td class='n'>{_num(v)}</td>" if _is_number(v) else f"<td>{_num(v)}</td>" for v in r)
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _legend(fates: Iterable[str]) -> str:
    return "<p class='legend'>Border: " + "".join(
        f"<span style='border-color:{_FATE_COLOURS[f]}'>{esc(FATES[f])}</span>" for f in fates) + "</p>"


def _note(text: str) -> str:
    return f"<p class='note'>{esc(text)}</p>"


# ---------------------------------------------------------------------------------------------
# the report


class _Run:
    """What the sections share: the run's paths and params, images read on demand, thumbnails."""

    def __init__(self, root: Path, out: Path, p: ReportParams, params: Mapping, inputs: Inputs):
        self.root, self.out, self.p, self.params, self.i = root, out, p, params, inputs
        self.n_images = 0
        self.figures: list[Path] = []
        self._fates: dict[str, str] | None = None

    def path(self, rel: str, *more: str) -> Path:
        return self.root.joinpath(rel, *more)

    def metrics(self, name: str) -> dict:
        return _json(self.path(self.i.metrics, f"{name}.json"))

    def metrics_or_empty(self, name: str) -> dict:
        try:
            return self.metrics(name)
        except _Missing:
            return {}

    def images(self, keys: Iterable[str], dirs: Sequence[str] | None = None) -> dict[str, bytes]:
        dirs = dirs or (self.i.retrieved, self.i.generated)
        return read_images([self.path(d) for d in dirs], keys)

    def fate(self, key: str) -> str:
        """What became of a collected image: final | dedup | leakage | prune | takedown | "" (unknown)."""
        if self._fates is None:
            fates: dict[str, str] = {}
            steps = ((self.path(self.i.dedup, "manifest.parquet"), "kept", "dedup", False),
                     (self.path(self.i.leakage, "manifest.parquet"), "kept", "leakage", False),
                     (self.path(self.i.prune, "ranks.parquet"), "removed", "prune", True))
            pruned_kept: list[str] = []
            for path, col, stage, flag in steps:
                df = _parquet(path, ["key", col], optional=True)
                if df is None:
                    continue
                for k in df.loc[df[col].astype(bool) == flag, "key"]:
                    fates.setdefault(k, stage)
                if stage == "prune":
                    pruned_kept = list(df.loc[~df[col].astype(bool), "key"])
            index = _parquet(self.path(self.i.dataset, "index.parquet"), ["key"], optional=True)
            if index is not None:
                final = set(index["key"])
                for k in pruned_kept:          # kept by prune but not exported: the takedown list
                    fates.setdefault(k, "final" if k in final else "takedown")
                for k in final:
                    fates[k] = "final"
            self._fates = fates
        return self._fates.get(key, "")

    def figure(self, key: str, data: bytes | None, lines: Sequence[str] = (), fate: str | None = None,
               title: str = "", image=None) -> str:
        """One thumbnail with caption lines; `image` (PIL) replaces the bytes (e.g. with boxes drawn)."""
        from pas.curate.report import thumbnail_b64

        fate = self.fate(key) if fate is None else fate
        tip = " — ".join([key, FATES.get(fate, fate)] + ([title] if title else []))
        if image is None and data is None:
            img = "<div class='note'>(image missing)</div>"
        else:
            self.n_images += 1
            b64 = thumbnail_b64(image if image is not None else data, self.p.thumb)
            img = f"<img alt='{esc(key)}' title='{esc(tip)}' src='data:image/jpeg;base64,{b64}'>"
        cap = "<br>".join(esc(s) for s in lines)
        return f"<figure class='{esc(fate)}'>{img}<figcaption>{cap}</figcaption></figure>"

    def row(self, label: str, figures: Sequence[str]) -> str:
        """A labelled row of thumbnails (`label` is HTML)."""
        body = "".join(figures) or _note("no images")
        return f"<div class='row'><div class='label'>{label}</div><div class='thumbs'>{body}</div></div>"

    @staticmethod
    def blocks(blocks: Sequence[tuple[str, Sequence[str]]]) -> str:
        """(label HTML, figures) blocks (a pair, a group), wrapped side by side."""
        if not blocks:
            return _note("none")
        return "<div class='thumbs'>" + "".join(f"<div class='pair'>{lab}<div>{''.join(figs)}</div></div>"
                                                for lab, figs in blocks) + "</div>"


def _score_lines(r) -> list[str]:
    """An image's OOD scores as caption lines: the words of the prune stage's sample grid."""
    from pas.curate.prune_plots import score_caption   # imports PIL: not on `import pas.report` (params)

    return score_caption(r.ood_b, r.ood_bprime, r.ood_blur_delta).split("\n")


def _short(text: Any, n: int = 48) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


# --- headline and funnel ---------------------------------------------------------------------

def _section_summary(run: _Run) -> str:
    s = run.metrics("summary")
    dom = run.params.get("domain") or {}
    size = s.get("size", {})
    rows = [("domain", f"{dom.get('name', '')}: {dom.get('description', '')}"),
            ("final dataset", f"{size.get('total', 0):,} images ({size.get('real', 0):,} real, "
                              f"{size.get('synthetic', 0):,} synthetic)"),
            ("concept bank |B|", s.get("concept_bank")),
            *((f"{ref} classes covered", f"{v:.1%}") for ref, v in s.get("covered", {}).items()),
            *((f"{name} top-1", f"kNN {v['knn']:.3f} (baseline {v['knn_baseline']:.3f}), linear "
                                f"{v['linear']:.3f} (baseline {v['linear_baseline']:.3f})")
              for name, v in s.get("top1", {}).items()),
            *((f"domain precision ({k})", f"{v:.3f}") for k, v in (s.get("domain_precision") or {}).items())]
    return table(("", "value"), rows)


def plot_funnel(funnel: Mapping[str, Mapping], path: Path, title: str) -> Path:
    """Horizontal bars in pipeline order (first stage on top), real and synthetic stacked."""
    from pas.plots import REAL, SYNTHETIC, figure, save_png

    stages = [s for s in FUNNEL if s in funnel]
    with figure(8.0, 0.45 * max(len(stages), 1) + 1.2) as (fig, ax):
        y = np.arange(len(stages))
        n = np.array([funnel[s].get("n", 0) for s in stages], float)
        real = np.array([funnel[s].get("real") or 0 for s in stages], float)
        synth = np.array([funnel[s].get("synthetic") or 0 for s in stages], float)
        other = np.maximum(n - real - synth, 0)        # a stage that reports no split
        ax.barh(y, real, color=REAL, label="real")
        ax.barh(y, synth, left=real, color=SYNTHETIC, label="synthetic")
        if other.any():
            ax.barh(y, other, left=real + synth, color="#bbbbbb", label="not split")
        for yi, v in zip(y, n):
            ax.text(v, yi, f" {int(v):,}", va="center", fontsize=8)
        ax.set_yticks(y, [("prune (final)" if s == "prune" else s) for s in stages])
        ax.invert_yaxis()
        ax.set_xlim(0, max(n.max() if len(n) else 1, 1) * 1.12)
        ax.set_xlabel("images after the stage")
        ax.grid(axis="y", visible=False)
        ax.legend(loc="lower right")
        ax.set_title(title)
        return save_png(fig, path)


def _section_funnel(run: _Run) -> str:
    f = run.metrics("dataset")
    fig = plot_funnel(f, run.out / "funnel.png", "Dataset size after each stage (pipeline order)")
    run.figures.append(fig)
    prec = run.metrics_or_empty("precision")
    prec_of = {"retrieve": "retrieve", "dedup": "dedup", "leakage": "leakage", "prune": "final"}
    rows = [(s, f[s].get("n"), f[s].get("real"), f[s].get("synthetic"),
             prec.get(prec_of.get(s, ""), {}).get("domain_precision")) for s in FUNNEL if s in f]
    parts = [f"<img class='plot' src='{fig.name}' alt='dataset funnel'>",
             table(("stage", "images", "real", "synthetic", "domain precision of the real images"), rows)]
    if prec.get("domain_categories"):
        parts.append(_note(f"Domain precision: fraction of real images from the pool categories "
                           f"{', '.join(prec['domain_categories'])} (evaluation only; pool: "
                           f"{prec.get('pool', {}).get('domain_precision', '–')})."))
    return "".join(parts)


# --- concepts -------------------------------------------------------------------------------

def plot_concepts(history: Mapping, lambda_1: float, lambda_2: float, stops: Mapping[str, str],
                  path: Path) -> Path:
    """Each L1 sample's / L2 round's growth |new| / |C before| against λ1 / λ2, the rule that stops
    the loop once growth falls below λ (log scale; the bank size is written at each point)."""
    from pas.plots import KNEE, REAL, figure, save_png

    loops = (("generation", "n", "L1 sample N", lambda_1, "λ1", "C"),
             ("expansion", "round", "L2 round i", lambda_2, "λ2", "B"))
    with figure(9.5, 3.4, 1, 2) as (fig, axes):
        for ax, (loop, step, xlabel, lam, sym, S) in zip(axes, loops):
            hist = history.get(loop, [])
            size = {r[step]: r["size"] for r in hist}
            pts = []
            for r in hist:            # the first step has nothing before it: no growth to compare
                before = size.get(r[step] - 1)
                if r.get("new") is not None and before:
                    pts.append((r[step], r["new"] / before, r["size"]))
            floor = lam / 10          # growth 0 drawn at the floor, on the log axis
            if pts:
                x = [q[0] for q in pts]
                g = [max(q[1], floor) for q in pts]
                ax.plot(x, g, "o-", color=REAL, label=f"growth |new| / |{S}| before")
                for xi, gi, n in zip(x, g, (q[2] for q in pts)):
                    ax.annotate(f"|{S}|={n:,}", (xi, gi), textcoords="offset points", xytext=(4, 4), fontsize=7)
                ax.set_xticks(x)
            ax.axhline(lam, color=KNEE, ls="--", label=f"{sym} = {lam:g}: stop below")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("growth per step")
            ax.set_title(f"{'L1 sampling' if loop == 'generation' else 'L2 expansion'}: "
                         f"stopped by {stops.get(loop) or '?'}")
            ax.legend(loc="best")
        return save_png(fig, path)


def _section_concepts(run: _Run) -> str:
    m = run.metrics("concepts")
    d = run.path(run.i.concepts)
    parts = []
    stops = {"generation": m.get("generation_stop"), "expansion": m.get("expansion_stop")}
    caps = set(m.get("stopped_by_cap", []))
    rows = [("B0 (after L1 sampling)", m.get("B0"), m.get("generation_stop"),
             "cap" if "generation" in caps else "λ1 rule"),
            ("B before validation (after L2)", m.get("B_before_validation"), m.get("expansion_stop"),
             "cap" if "expansion" in caps else "λ2 rule"),
            ("B after validation (L3)", m.get("B_after_validation"), m.get("validator"), "")]
    parts.append(table(("set", "concepts", "stop reason / validator", "stopped by"), rows))
    try:
        hist = _json(d / "history.json")
        fig = plot_concepts(hist, run.p.lambda_1, run.p.lambda_2, stops, run.out / "concepts.png")
        run.figures.append(fig)
        parts.append(f"<img class='plot' src='{fig.name}' alt='concept discovery'>")
    except _Missing as e:
        parts.append(_note(f"no discovery history ({e.args[0]} missing)"))
    bank = _parquet(d / "bank.parquet")
    bank = bank.assign(_acc=~bank["accepted"].astype(bool)).sort_values(
        ["_acc", "score", "concept"], ascending=[True, False, True], kind="stable")
    shown = bank.head(run.p.table_rows)
    parts.append(f"<h3>Concept bank: {int(bank['accepted'].sum()):,} accepted of {len(bank):,}</h3>")
    parts.append("<div class='scroll'>" + table(
        ("concept", "accepted", "validation score", "from (L2 seed concept)", "iteration"),
        ((r.concept, "yes" if r.accepted else "no", float(r.score),
          "" if not isinstance(r.origin, str) else r.origin, int(r.first_iteration))
         for r in shown.itertuples())) + "</div>")
    if len(bank) > len(shown):
        parts.append(_note(f"{len(bank) - len(shown):,} more concepts not listed (report.table_rows)."))
    return "".join(parts)


# --- retrieved and generated per concept ----------------------------------------------------

def _section_collected(run: _Run) -> str:
    p = run.p
    bank = run.path(run.i.concepts, "bank.parquet")
    if not bank.is_file():
        raise _Missing(bank)
    accepted = load_bank(bank)
    chosen = _pick(accepted, p.concepts, p.seed, 1)
    hits = _parquet(run.path(run.i.retrieved, "hits.parquet"), optional=True)
    gen = _parquet(run.path(run.i.generated, "index.parquet"), optional=True)
    if hits is None and gen is None:
        raise _Missing(run.path(run.i.retrieved, "hits.parquet"))

    def first(df, c: str, order: list[str]) -> list[dict]:
        """The first `per_concept` rows of concept `c` in `order` (none where the input is absent)."""
        if df is None:
            return []
        return df[df["concept"] == c].sort_values(order, kind="stable").head(p.per_concept).to_dict("records")

    per = {c: (first(hits, c, ["rank"]), first(gen, c, ["caption_idx", "image_idx", "key"])) for c in chosen}
    imgs = run.images({r["key"] for rs in per.values() for part in rs for r in part})
    parts = [_note(f"{len(chosen)} of {len(accepted):,} accepted concepts (seeded choice); per concept "
                   f"the top {p.per_concept} retrieved pool images (CLIP similarity) and the first "
                   f"{p.per_concept} generated ones (hover for the caption)."),
             _legend(("final", "dedup", "leakage", "prune"))]
    for c in chosen:
        got, made = per[c]
        parts.append(f"<h3>{esc(c)}</h3>")
        parts.append(run.row("retrieved", [run.figure(r["key"], imgs.get(r["key"]),
                                                      [f"#{int(r['rank']) + 1} sim {r['similarity']:.3f}"])
                                           for r in got]))
        parts.append(run.row("generated", [run.figure(r["key"], imgs.get(r["key"]),
                                                      [_short(r.get("caption"), 40)], title=str(r.get("caption", "")))
                                           for r in made]))
    return "".join(parts)


# --- dedup ----------------------------------------------------------------------------------

def near_misses(descriptors: np.ndarray, rows: Sequence[int], chunk: int = 65536) -> list[tuple[int, int, float]]:
    """(row, its nearest other row, cosine) for each of `rows` over L2-normalised `descriptors` (may be
    a memory map: read in chunks of rows)."""
    q = np.asarray(descriptors[np.asarray(rows, dtype=np.int64)], np.float32)
    best = np.full(len(rows), -np.inf, np.float32)
    arg = np.full(len(rows), -1, np.int64)
    for start in range(0, len(descriptors), chunk):
        block = np.asarray(descriptors[start:start + chunk], np.float32)
        sims = q @ block.T                                   # (len(rows), chunk)
        for i, r in enumerate(rows):
            if start <= r < start + len(block):
                sims[i, r - start] = -np.inf                 # not itself
        j = sims.argmax(1)
        better = sims[np.arange(len(rows)), j] > best
        best[better] = sims[np.arange(len(rows)), j][better]
        arg[better] = start + j[better]
    return [(int(r), int(a), float(b)) for r, a, b in zip(rows, arg, best)]


def _section_dedup(run: _Run) -> str:
    from pas.curate.report import largest_groups

    p, d = run.p, run.path(run.i.dedup)
    man = _parquet(d / "manifest.parquet")
    m = run.metrics_or_empty("dedup")
    groups = largest_groups(man, p.dedup_groups, p.per_group)
    # near-misses: images no edge joined (singletons) whose best neighbour is closest under λ_dup
    single = man[man["component_size"] == 1].sort_values(["score", "key"], ascending=[False, True],
                                                         kind="stable")
    single = single[single["score"] <= p.lambda_dup]
    pairs: list[tuple[str, str, float]] = []
    if p.pairs and len(single):
        try:
            keys = _parquet(d / "keys.parquet", ["row", "key"]).sort_values("row")
            desc = np.load(d / "descriptors.npy", mmap_mode="r")
        except FileNotFoundError:
            keys = desc = None
        if keys is not None:
            if len(keys) != len(desc):
                raise ValueError(f"{d}: keys.parquet has {len(keys)} rows, descriptors.npy {len(desc)}")
            row_of = dict(zip(keys["key"], keys["row"]))
            key_of = dict(zip(keys["row"], keys["key"]))
            seen: set[frozenset] = set()
            cand = [row_of[k] for k in single["key"].head(2 * p.pairs) if k in row_of]
            for r, a, cos in near_misses(desc, cand):
                pair = frozenset((r, a))
                if a >= 0 and pair not in seen and len(pairs) < p.pairs:
                    seen.add(pair)
                    pairs.append((key_of[r], key_of[a], cos))
    imgs = run.images({k for g in groups for k in g["keys"]} | {k for a, b, _ in pairs for k in (a, b)})
    score = dict(zip(man["key"], man["score"]))
    parts = [_note(f"{m.get('n_in', len(man)):,} images in, {m.get('n_kept', int(man['kept'].sum())):,} kept; "
                   f"{m.get('components_gt1', '?')} groups of duplicates (SSCD cosine > λ_dup = "
                   f"{p.lambda_dup:g}), the {len(groups)} largest below; the first image of each group is "
                   f"the one kept."), _legend(("final", "dedup", "leakage", "prune"))]
    parts.append(run.blocks([
        (f"group {g['component']}: {g['size']} images", [
            run.figure(k, imgs.get(k), [("kept" if k == g["representative"] else "duplicate"),
                                        f"max cos {score.get(k, float('nan')):.4f}"]) for k in g["keys"]])
        for g in groups]))
    parts.append(f"<h3>Near-misses: closest pairs under λ_dup = {p.lambda_dup:g}</h3>")
    parts.append(_note("Images that no edge joined, with their nearest neighbour: the pairs λ_dup just "
                       "keeps apart (if these are copies, λ_dup is too high)."))
    parts.append(run.blocks([(f"cos {cos:.5f}", [run.figure(a, imgs.get(a), [a]), run.figure(b, imgs.get(b), [b])])
                             for a, b, cos in pairs]))
    return "".join(parts)


# --- leakage --------------------------------------------------------------------------------

def _section_leakage(run: _Run) -> str:
    p = run.p
    chk = _parquet(run.path(run.i.leakage, "checked.parquet"))
    chk = chk[chk["score"].notna()].sort_values(["score", "key"], ascending=[False, True], kind="stable")
    leaks = chk[chk["score"] > p.lambda_leak].head(p.pairs)
    near = chk[chk["score"] <= p.lambda_leak].head(p.pairs)
    m = run.metrics_or_empty("leakage")
    split = str((run.params.get("leakage") or {}).get("split", "test"))
    shown = list(leaks.itertuples()) + list(near.itertuples())
    imgs = run.images({r.key for r in shown})
    tests: dict[str, bytes] = {}
    labels: dict[str, str] = {}
    for ev in sorted({r.evalset for r in shown if r.evalset}):
        d = run.path(run.i.evalsets, ev, split)
        if not d.is_dir():
            d = run.path(run.i.evalsets, ev)
        want = {r.nearest_key for r in shown if r.evalset == ev}
        tests.update(read_images([d], want))
        idx = _parquet(d / "index.parquet", optional=True)
        if idx is not None and "label_name" in idx:
            labels.update(zip(idx["key"], idx["label_name"].astype(str)))

    def pair(r) -> tuple[str, list[str]]:
        return (f"cos {r.score:.5f}, {int(r.n_matches)} test image{'s' if r.n_matches != 1 else ''} above λ_leak",
                [run.figure(r.key, imgs.get(r.key), [r.key]),
                 run.figure(r.nearest_key, tests.get(r.nearest_key),
                            [f"{r.evalset} {split}", labels.get(r.nearest_key, "")], fate="test")])

    parts = [_note(f"{m.get('n_checked', len(chk)):,} collected images checked against "
                   f"{sum((m.get('n_test') or {}).values()):,} eval test images; "
                   f"{m.get('n_checked_leaking', int((chk['score'] > p.lambda_leak).sum())):,} above λ_leak = "
                   f"{p.lambda_leak:g}, {m['n_in'] - m['n_kept'] if 'n_kept' in m else '?'} dropped (scope {m.get('scope', '?')}). "
                   "Left: the collected image; right: the test image it matched."),
             _legend(("final", "dedup", "leakage", "prune", "test")),
             f"<h3>Leaks: the {len(leaks)} closest to a test image</h3>"]
    parts.append(run.blocks([pair(r) for r in leaks.itertuples()]))
    parts.append(f"<h3>Near-misses: the {len(near)} closest under λ_leak = {p.lambda_leak:g}</h3>")
    parts.append(run.blocks([pair(r) for r in near.itertuples()]))
    return "".join(parts)


# --- ood ------------------------------------------------------------------------------------

BOX_COLOUR = (255, 0, 255)     # magenta: unlike any border colour


def draw_boxes(img, boxes: np.ndarray):
    """A copy of `img` with text boxes `(K, 4, 2)` outlined."""
    from PIL import ImageDraw

    img = img.convert("RGB")
    d = ImageDraw.Draw(img)
    w = max(2, round(max(img.size) / 48))      # about 2-3 px in a thumbnail
    for box in np.asarray(boxes, np.float32).reshape(-1, 4, 2):
        pts = [(float(x), float(y)) for x, y in box]
        d.line(pts + pts[:1], fill=BOX_COLOUR, width=w)
    return img


def _detector(params: Mapping) -> Callable:
    """The ood stage's text detector, with its params (so the boxes are the ones it counted)."""
    from pas.curate.textblur import TextDetector

    ood = params.get("ood") or {}
    keys = {"limit_side_len": "det_limit_side_len", "box_thresh": "det_box_thresh", "threads": "threads"}
    kw = {k: ood[key] for k, key in keys.items() if key in ood}
    return TextDetector(**kw).detect


def _section_ood(run: _Run) -> str:
    from pas.io.shards import decode_image

    p = run.p
    sc = _parquet(run.path(run.i.ood)).sort_values("key", kind="stable")
    m = run.metrics_or_empty("ood")
    lists = []
    for s in SCORES:
        pool = sc[sc["text_boxes"] > 0] if s == "ood_blur_delta" else sc
        hi = pool.sort_values([s, "key"], ascending=[False, True], kind="stable").head(p.ood_extremes)
        lo = pool.sort_values([s, "key"], ascending=[True, True], kind="stable").head(p.ood_extremes)
        lists.append((s, hi, lo, len(pool)))
    keys = {k for _, hi, lo, _ in lists for k in list(hi["key"]) + list(lo["key"])}
    imgs = run.images(keys)
    text_keys = set(sc.loc[sc["key"].isin(keys) & (sc["text_boxes"] > 0), "key"])
    detect = _detector(run.params) if text_keys else None
    drawn = {}
    for k in sorted(text_keys):
        if k in imgs:
            im = decode_image(imgs[k])
            drawn[k] = draw_boxes(im, detect(im))

    def fig(r) -> str:
        lines = [*_score_lines(r), f"{int(r.text_boxes)} text box{'es' if r.text_boxes != 1 else ''}"]
        return run.figure(r.key, imgs.get(r.key), lines, image=drawn.get(r.key))

    parts = [_note(f"{len(sc):,} images scored (mode {m.get('mode', '?')}); {m.get('n_with_text', '?')} "
                   f"with detected text (magenta boxes: the ood stage's detector and settings). OOD_B: over the concept "
                   f"bank B; OOD_B′: over the generalised set B′; Δblur = OOD_B(I′) − OOD_B(I), I′ with "
                   f"its text blurred (only images with text)."),
             _legend(("final", "prune"))]
    names = {"ood_b": "OOD_B", "ood_bprime": "OOD_B′", "ood_blur_delta": "Δblur"}
    for s, hi, lo, n in lists:
        parts.append(f"<h3>{names[s]} ({n:,} images)</h3>")
        parts.append(run.row(f"highest {names[s]}", [fig(r) for r in hi.itertuples()]))
        parts.append(run.row(f"lowest {names[s]}", [fig(r) for r in lo.itertuples()]))
    return "".join(parts)


# --- prune ----------------------------------------------------------------------------------

def _section_prune(run: _Run) -> str:
    p, d = run.p, run.path(run.i.prune)
    ranks = _parquet(d / "ranks.parquet")
    m = run.metrics_or_empty("prune")
    parts = []
    if (d / "peel.png").is_file():
        shutil.copyfile(d / "peel.png", run.out / "peel.png")
        run.figures.append(run.out / "peel.png")
        parts.append("<img class='plot' src='peel.png' alt='Pareto peel curves with knees'>")
    knee = {}
    if (d / "knees.csv").is_file():
        import pandas as pd

        try:
            knee = {r.metric: (int(r.removed), float(r.value)) for r in pd.read_csv(d / "knees.csv").itertuples()}
        except Exception as e:  # noqa: BLE001 - a CSV has many ways to be wrong; name the file
            raise ValueError(f"{d / 'knees.csv'}: unreadable ({e})") from None
    reasons = m.get("knee_reason", {})
    rows = [(s, *knee.get(s, (None, None)), reasons.get(s, "")) for s in SCORES]
    parts.append(table(("metric", "knee: images removed", "mean score there", "kneedle"), rows))
    parts.append(_note(f"{m.get('n_in', len(ranks)):,} images in {m.get('fronts', '?')} fronts; stop "
                       f"{m.get('stop', '?')} ({m.get('stop_reason', '?')}): the {m.get('fronts_removed', '?')} "
                       f"worst fronts, {(m.get('dropped') or {}).get('pareto', int(ranks['removed'].sum())):,} images, removed."))
    rows_by_front = []
    for n in p.fronts:
        f = ranks[ranks["front"] == n - 1].sort_values("key", kind="stable")
        if len(f):
            rows_by_front.append((n, f, _pick(list(f.itertuples()), p.per_concept, p.seed, 100 + n)))
    imgs = run.images({r.key for _, _, rs in rows_by_front for r in rs})
    parts.append(_legend(("final", "prune", "takedown")))
    for n, f, rs in rows_by_front:
        state = "removed" if f["removed"].all() else ("kept" if not f["removed"].any() else "partly removed")
        parts.append(run.row(f"Pareto {n}: {len(f):,} images, {state}",
                             [run.figure(r.key, imgs.get(r.key), _score_lines(r)) for r in rs]))
    return "".join(parts)


# --- final dataset and evaluation -----------------------------------------------------------

def _section_dataset(run: _Run) -> str:
    p = run.p
    idx = _parquet(run.path(run.i.dataset, "index.parquet")).sort_values("key", kind="stable")
    by_source = {src: list(g.itertuples()) for src, g in idx.groupby("source", sort=True)}
    # an equal share per source; what a small source leaves goes to the others
    chosen, left = {}, p.dataset_samples
    for i, (src, rows) in enumerate(sorted(by_source.items(), key=lambda t: (len(t[1]), t[0]))):
        chosen[src] = _pick(rows, left // (len(by_source) - i), p.seed, 2)
        left -= len(chosen[src])
    imgs = run.images([r.key for rs in chosen.values() for r in rs], dirs=[run.i.dataset])
    parts = [_note(f"{len(idx):,} images ("
                   + ", ".join(f"{len(v):,} {src}" for src, v in sorted(by_source.items()))
                   + f"); {sum(len(v) for v in chosen.values())} shown (seeded choice, hover for the caption).")]
    for src, rows in sorted(chosen.items()):
        figs = [run.figure(r.key, imgs.get(r.key), [_short(", ".join(() if r.concepts is None else r.concepts), 36)],
                           fate="final", title=str(r.caption or "")) for r in rows]
        parts.append(run.row(f"{esc(src)} ({len(by_source[src]):,})", figs))
    return "".join(parts)


def _section_eval(run: _Run) -> str:
    e = run.metrics("eval")
    pt = run.metrics_or_empty("pretrain")
    rows = []
    for name, r in sorted(e.get("sets", {}).items()):
        pre, base = r.get("pretrained", {}), r.get("baseline", {})
        rows.append((name, r.get("n_train"), r.get("n_test"), r.get("n_classes"),
                     pre.get("knn_top1"), base.get("knn_top1"), r.get("gain_knn_top1"),
                     pre.get("linear_top1"), base.get("linear_top1"), r.get("gain_linear_top1")))
    return table(("eval set", "train", "test", "classes", "kNN top-1", "baseline", "gain",
                  "linear top-1", "baseline", "gain"), rows) + _note(
        f"Backbone {e.get('backbone', '?')} ({pt.get('method', '?')}, {e.get('image_size', '?')} px), "
        f"pretrained {e.get('pretrain_epochs', '?')} epochs on {_num(e.get('pretrain_images'))} images "
        f"({_num(e.get('pretrain_forward_passes'))} forward passes); baseline: {e.get('baseline', '?')}; "
        f"kNN k = {e.get('knn_k', '?')}, linear probe {e.get('linear_epochs', '?')} epochs.")


SECTIONS: tuple[tuple[str, str, Callable[[_Run], str]], ...] = (
    ("summary", "Summary", _section_summary),
    ("funnel", "Dataset funnel", _section_funnel),
    ("concepts", "Concept bank (§3.1)", _section_concepts),
    ("collected", "Retrieved and generated, per concept (§3.2)", _section_collected),
    ("dedup", "Deduplication (§3.3)", _section_dedup),
    ("leakage", "Leakage against the eval test sets (§3.3)", _section_leakage),
    ("ood", "OOD scores: the extremes (§3.3)", _section_ood),
    ("prune", "Pareto pruning (§3.3)", _section_prune),
    ("dataset", "The final dataset", _section_dataset),
    ("eval", "Evaluation (§4)", _section_eval),
)


def build_report(root: str | Path, out_dir: str | Path, params: Mapping | None = None,
                 inputs: Inputs | None = None) -> ReportResult:
    """Write `out_dir/index.html` (+ its PNG figures) for the run whose outputs lie under `root`.

    `params`: the run's params dict (default: `root/params.yaml`, validated); `inputs`: where each
    input lies under `root` (default: the pipeline's layout). Returns what was written and which
    sections had missing inputs. Raises ValueError naming the file for an input that cannot be read.
    """
    from pas.params import build, load

    root, out = Path(root), Path(out_dir)
    inputs = inputs or Inputs()
    if params is None:
        params = load(root / inputs.params)
    p = build(ReportParams, params, section="report")
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:                      # no stale figure of an earlier run
        (out / name).unlink(missing_ok=True)
    run = _Run(root, out, p, params, inputs)
    result = ReportResult(index=out / "index.html")
    dom = params.get("domain") or {}
    title = f"pas run report: {dom.get('name', '')}"
    body = []
    for sid, heading, fn in SECTIONS:
        try:
            content = fn(run)
        except _Missing as e:
            missing = Path(e.args[0])
            rel = missing.relative_to(root) if missing.is_relative_to(root) else missing
            result.missing[sid] = str(rel)
            content = _note(f"Not available: {rel} is missing (its stage has not run).")
            log.info("report: section %s left out (%s missing)", sid, rel)
        body.append(f"<section id='{sid}'><h2>{esc(heading)}</h2>{content}</section>")
    nav = "".join(f"<a href='#{sid}'>{esc(h.split(' (')[0])}</a>" for sid, h, _ in SECTIONS)
    page = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{esc(title)}</h1>", f"<nav>{nav}</nav>", *body, "</body></html>"]
    result.index.write_text("\n".join(page) + "\n", encoding="utf-8")
    result.figures = list(run.figures)
    result.n_images = run.n_images
    return result

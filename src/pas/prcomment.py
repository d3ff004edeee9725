"""The pull-request comment of .github/workflows/metrics-diff.yml: the run's headline figures
(metrics/summary.json, named as `pas summary` prints them) against main, the params that changed, and
whether the plots diff holds main.

Pure: the JSON that `dvc metrics diff --all --json main`, `dvc params diff --json main` and
`dvc plots diff main --json` print in, markdown out. The workflow only writes the comment; the trusted
follow-up (.github/workflows/pr-comment.yml) posts it.

    python -m pas.prcomment body --metrics m.json --params p.json --plots pl.json --plots-url URL
    python -m pas.prcomment check-plots pl.json --rev main   # exit 1, naming what main's side lacks
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Mapping

from pas.summary import FUNNEL, PRECISION

MARKER = "<!-- pas-metrics-diff -->"   # first line: the follow-up updates the comment that starts with it
SUMMARY = "metrics/summary.json"
MAX_CHARS = 60_000                     # GitHub refuses comments over 65,536 characters
MAX_PARAMS = 40                        # params rows shown; a preset switch changes hundreds
TOP1 = {"knn": "kNN top-1", "knn_baseline": "kNN top-1 (baseline)", "linear": "linear top-1",
        "linear_baseline": "linear top-1 (baseline)"}


def _label(key: str) -> tuple[tuple, str]:
    """(sort key, label) of a flat summary key (`funnel.dedup`): the order and words of `summary_text`."""
    head, _, rest = key.partition(".")
    size = ("total", "real", "synthetic")
    if head == "size" and rest in size:
        return (0, size.index(rest)), {"total": "images"}.get(rest, f"images: {rest}")
    if head == "concept_bank" and not rest:
        return (1,), "concepts (|B| after validation)"
    if head == "funnel" and rest in FUNNEL:
        return (2, FUNNEL.index(rest)), f"funnel: {rest}"
    if head == "domain_precision" and rest in PRECISION:
        return (3, PRECISION.index(rest)), f"domain precision: {rest}"
    if head == "covered" and rest:
        return (4, rest), f"{rest}: classes covered"
    name, _, kind = rest.rpartition(".")
    if head == "top1" and name and kind in TOP1:
        return (5, name, list(TOP1).index(kind)), f"{name}: {TOP1[kind]}"
    return (6, key), key   # a figure added to summary.json later still shows, last


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:.3f}"


def _delta(old: Any, new: Any) -> str:
    if old is None or new is None:
        return "new" if old is None else "removed"
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        d = new - old
        if d == 0:
            return ""
        if isinstance(d, int):
            return f"{d:+,}"
        return f"{d:+.3f}" if abs(d) >= 5e-4 else f"{d:+.1e}"   # a change below the shown precision
    return "" if old == new else "changed"


def headline_rows(metrics_diff: Mapping[str, Mapping]) -> list[tuple[str, str, str, str]]:
    """(label, main, this PR, Δ) for every figure of metrics/summary.json in `dvc metrics diff --all
    --json` output, in summary order; the other metrics files are left out."""
    entries = metrics_diff.get(SUMMARY) or {}
    rows = sorted((_label(k), e.get("old"), e.get("new")) for k, e in entries.items())
    return [(label, _fmt(old), _fmt(new), _delta(old, new)) for (_, label), old, new in rows]


def other_changes(metrics_diff: Mapping[str, Mapping]) -> dict[str, int]:
    """{metrics file: figures that differ} for the files besides metrics/summary.json."""
    counts = {path: sum(e.get("old") != e.get("new") for e in entries.values())
              for path, entries in sorted(metrics_diff.items()) if path != SUMMARY}
    return {path: n for path, n in counts.items() if n}


def plot_problems(plots: Mapping[str, Any], rev: str = "main") -> list[str]:
    """What `dvc plots diff <rev> --json` could not draw: its errors, and plots without `rev` (DVC drops a
    revision whose outputs are not in the cache from the page without saying so)."""
    problems = [f"{e.get('rev', '?')}: {e.get('source') or e.get('type', 'error')}: {e.get('msg', '')}".rstrip(": ")
                for e in plots.get("errors") or []]
    data = plots.get("data") or {}
    if not data:
        problems.append("no plot could be drawn")
    for name, renders in sorted(data.items()):
        if not any(rev in (r.get("revisions") or []) for r in renders):
            problems.append(f"{name}: no {rev} version")
    return problems


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    cells = [header, tuple("---" for _ in header), *rows]
    return ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]


def comment_body(metrics_diff: Mapping, params_diff: Mapping, plots: Mapping | None = None,
                 plots_url: str | None = None, rev: str = "main") -> str:
    """The comment's markdown: headline figures, changed params, the plots link or what it lacks."""
    lines = [MARKER, f"## pas: headline figures vs {rev}", ""]
    rows = headline_rows(metrics_diff)
    if rows:
        lines += _table(("figure", rev, "this PR", "Δ"), rows)
    else:
        lines.append(f"No {SUMMARY} on either side: the run did not reach the `summary` stage.")
    others = other_changes(metrics_diff)
    if others:
        lines += ["", "Other metrics that differ (`dvc metrics diff " + rev + "`; full table in the plots "
                  "artifact): " + ", ".join(f"`{p}` ({n})" for p, n in others.items())]
    params = sorted((f"{k}" if path == "params.yaml" else f"{path}:{k}", _fmt(e.get("old")), _fmt(e.get("new")))
                    for path, entries in params_diff.items() for k, e in entries.items())
    lines += ["", f"### params vs {rev}", ""]
    if params:
        lines += _table(("param", rev, "this PR"), params[:MAX_PARAMS])
        if len(params) > MAX_PARAMS:
            lines.append(f"… and {len(params) - MAX_PARAMS} more (`dvc params diff {rev}`)")
    else:
        lines.append("No param changed.")
    lines += ["", f"### plots vs {rev}", ""]
    problems = plot_problems(plots, rev) if plots is not None else []
    if problems:
        lines += [f"**The plots diff is incomplete** ({rev}'s outputs are not in the DVC cache or remote; "
                  "the check fails):", ""] + [f"- {p}" for p in problems[:20]]
    if plots_url:
        lines.append(f"All plots, this PR over {rev}: [dvc plots diff artifact]({plots_url})")
    body = "\n".join(lines) + "\n"
    if len(body) > MAX_CHARS:
        body = body[:MAX_CHARS].rsplit("\n", 1)[0] + "\n\n… (cut: the comment is over GitHub's size limit)\n"
    return body


def _read(path: str | None) -> dict:
    if not path:
        return {}
    with open(path) as f:
        text = f.read().strip()
    return json.loads(text) if text else {}   # dvc prints nothing when there is no difference


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pas.prcomment", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("body", help="print the comment's markdown")
    b.add_argument("--metrics", required=True, help="`dvc metrics diff --all --json REV` output")
    b.add_argument("--params", help="`dvc params diff --json REV` output")
    b.add_argument("--plots", help="`dvc plots diff REV --json` output")
    b.add_argument("--plots-url")
    b.add_argument("--rev", default="main")
    c = sub.add_parser("check-plots", help="exit 1 when the plots diff lacks REV")
    c.add_argument("plots")
    c.add_argument("--rev", default="main")
    args = ap.parse_args(argv)
    if args.command == "body":
        sys.stdout.write(comment_body(_read(args.metrics), _read(args.params),
                                      _read(args.plots) if args.plots else None, args.plots_url, args.rev))
        return 0
    problems = plot_problems(_read(args.plots), args.rev)
    for p in problems:
        print(f"plots diff: {p}", file=sys.stderr)
    if problems:
        print(f"plots diff: {args.rev}'s plot outputs are missing from the DVC cache: push them to the remote "
              f"(dvc push on {args.rev}) or rerun this workflow on {args.rev} to refill the Actions cache",
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

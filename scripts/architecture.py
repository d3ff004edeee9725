"""Write the stage table of docs/ARCHITECTURE.md from dvc.yaml (or, with --check, fail when it is stale).

One row per dvc.yaml stage (a foreach stage is one row with `${key}` left in): the script it runs, what
it reads (upstream data/ and models/ outs, input folders), the pas modules it depends on, and what it
writes. Generated, so the page cannot drift from the pipeline; tests/test_architecture.py runs --check.

    python scripts/architecture.py           # rewrite the table
    python scripts/architecture.py --check   # exit 1 if docs/ARCHITECTURE.md is not what dvc.yaml says
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- stages:begin (scripts/architecture.py) -->", "<!-- stages:end -->"


def _paths(entries) -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics/plots list (entries are strings or {path: options})."""
    out = []
    for e in entries or []:
        out.extend([e] if isinstance(e, str) else list(e))
    return out


def _code(paths) -> str:
    return "<br>".join(f"`{p}`" for p in paths) or "–"


def _per_item(dep: str, items: list[dict]) -> list[str]:
    """A foreach dep naming `${item.x}` once per item's value (the table lists them all); others as they are."""
    if "${item." not in dep:
        return [dep]
    return [re.sub(r"\$\{item\.(\w+)\}", lambda m: str(it[m.group(1)]), dep) for it in items]


def rows(dvc_yaml: dict) -> list[tuple[str, str, str, str, str]]:
    table = []
    for name, st in dvc_yaml["stages"].items():
        body = st.get("do", st)
        if "foreach" in st:
            name = f"{name}@{{{', '.join(st['foreach'])}}}"
        cmd = " ".join(body["cmd"]) if isinstance(body["cmd"], list) else body["cmd"]
        script = re.search(r"stages/[\w]+\.py", cmd)
        items = list((st.get("foreach") or {}).values())
        deps = [x for d in _paths(body.get("deps")) for x in _per_item(d, items)]
        mods = sorted({"pas." + d[len("src/pas/"):-3].replace("/", ".")
                       for d in deps if d.startswith("src/pas/") and d.endswith(".py")})
        reads = [d for d in deps if d != "data/params.ok" and not d.startswith(("src/", "stages/", "containers/"))
                 and d not in ("params.yaml",)]
        writes = _paths(body.get("outs")) + _paths(body.get("metrics")) + _paths(body.get("plots"))
        table.append((f"`{name}`", f"`{script.group(0)}`" if script else "–", _code(reads),
                      ", ".join(f"`{m}`" for m in mods) or "–", _code(writes)))
    return table


def render(dvc_yaml: dict) -> str:
    lines = [BEGIN, "", "| stage | script | reads | library | writes |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(dvc_yaml)]
    return "\n".join(lines + ["", END])


def updated(page: str, dvc_yaml: dict) -> str:
    if BEGIN not in page or END not in page:
        raise SystemExit(f"docs/ARCHITECTURE.md: the markers {BEGIN!r} … {END!r} are missing")
    head, rest = page.split(BEGIN, 1)
    return head + render(dvc_yaml) + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the page is stale; write nothing")
    ap.add_argument("--page", type=Path, default=ROOT / "docs" / "ARCHITECTURE.md")
    ap.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml")
    args = ap.parse_args(argv)
    page = args.page.read_text()
    new = updated(page, yaml.safe_load(args.dvc_yaml.read_text()))
    if args.check:
        if new != page:
            print(f"{args.page}: the stage table is stale: run python scripts/architecture.py", file=sys.stderr)
            return 1
        return 0
    args.page.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Check that each GPU stack's install recipe resolves against the package index, installing nothing.

    python containers/resolve_stacks.py [--python 3.11] [--out DIR] [llm diffusion vision]

For each stack: `pip install --dry-run --ignore-installed --report DIR/<stack>-py<ver>.json <list>`, the
list being pyproject's `[project.optional-dependencies].<stack>` (what `scripts/install.sh --stack`
installs, the pins of containers/<stack>.def). This machine's pip configuration files, find-links and
constraints are ignored (PIP_CONFIG_FILE=/dev/null), so only the index decides; PIP_INDEX_URL is kept.
`--python` other than the running interpreter's resolves for that version on manylinux x86_64, wheels
only. Prints one line per stack (resolved package count and the key versions) and exits 1 if any fails.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACKS = ("llm", "diffusion", "vision")
KEY = ("vllm", "torch", "torchvision", "numpy", "transformers", "diffusers", "faiss-gpu", "open-clip-torch")
LOCAL_ONLY = ("PIP_CONFIG_FILE", "PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX")


def requirements(stack: str) -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][stack]


def resolve(stack: str, python: str, out: Path) -> tuple[bool, str]:
    report = out / f"{stack}-py{python}.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report)]
    if python != "%d.%d" % sys.version_info[:2]:
        cmd += ["--python-version", python, "--implementation", "cp", "--only-binary=:all:"]
        for glibc in range(39, 16, -1):     # the tags a glibc 2.39 x86_64 machine accepts
            cmd += ["--platform", f"manylinux_2_{glibc}_x86_64"]
        cmd += ["--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_ONLY}
    env["PIP_CONFIG_FILE"] = os.devnull
    r = subprocess.run(cmd + requirements(stack), env=env, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("ERROR")] or ["(no ERROR line)"]
        return False, " | ".join(lines)[-600:]
    got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    keys = ", ".join(f"{k} {got[k]}" for k in KEY if k in got)
    return True, f"{len(got)} packages: {keys}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stacks", nargs="*", help=f"default: all of {', '.join(STACKS)}")
    ap.add_argument("--python", default="%d.%d" % sys.version_info[:2])
    ap.add_argument("--out", default="/tmp/pas-resolve", help="folder for pip's JSON reports")
    args = ap.parse_args(argv)
    bad = sorted(set(args.stacks) - set(STACKS))
    if bad:
        ap.error(f"unknown stack {bad[0]!r} (stacks: {', '.join(STACKS)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    for stack in args.stacks or STACKS:
        good, what = resolve(stack, args.python, out)
        ok &= good
        print(f"{stack} (python {args.python}, linux x86_64): {'resolves' if good else 'FAILS'}: {what}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""DVC stage `params`: validate the whole params.yaml before any other stage runs.

Every other stage depends on `--out`, so DVC runs this one first whenever params.yaml (or a validator)
changed. A typo or a bad value anywhere, also under a key that no stage declares (which DVC alone would
silently ignore: no stage is out of date), then stops `dvc repro` / `dvc exp run` with one line naming
the key, before anything runs or DVC deletes any stage's outputs. The output's bytes never depend on
the values, so a passing check reruns nothing downstream.

With `--dvc-yaml` it also checks what DVC templating cannot express: the `evalsets` stage must depend
on every eval set's folder. dvc.yaml lists `${eval.root}`, the folder holding the sets, so a profile may
have any number of them (a template cannot loop over `eval.sets`); a set outside it needs its own
`${eval.sets[i].path}` (or literal path) line. And with `retrieve.backend: clip_service` nothing reads
`pool.source`, yet dvc.yaml's pool stage (and models@clip/@sscd) depend on it: it must exist, or DVC
stops on a missing dep; the presets name the placeholder `configs/no-pool`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

from pas.params import ParamsError, load, run_stage

OK = "params.yaml passed pas.params.validate\n"   # constant: downstream stages see no change


def _interpolate(dep: str, params: dict) -> str:
    """`${a.b[i].c}` in a dvc.yaml dep replaced by its params value (as DVC does); unknown keys stay."""
    def value(m: re.Match) -> str:
        v = params
        for part in re.findall(r"[^.\[\]]+", m.group(1)):
            try:
                v = v[int(part)] if isinstance(v, list) else v[part]
            except (KeyError, IndexError, ValueError, TypeError):
                return m.group(0)
        return str(v)
    return re.sub(r"\$\{([^}]+)\}", value, dep)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_evalsets_deps(params: dict, dvc: dict, base: str | Path = ".") -> None:
    """Raise ParamsError unless every `eval.sets[i]` folder is, or is inside, a dep of dvc.yaml's
    `evalsets` stage: `${eval.root}` (one dep for any number of sets; relative set paths are under
    it), `${eval.sets[i].path}` or a literal folder. Relative deps are relative to `base` (dvc.yaml's
    folder)."""
    deps = [str(d).strip() for d in dvc.get("stages", {}).get("evalsets", {}).get("deps", [])]
    ev = params.get("eval") or {}
    root = ev.get("root")
    folders = [os.path.normpath(os.path.join(base, _interpolate(d, params))) for d in deps]
    for i, spec in enumerate(ev.get("sets") or []):
        path = str(spec.get("path"))
        if root is not None and not os.path.isabs(path):
            path = os.path.join(str(root), path)
        path = os.path.normpath(os.path.join(base, path))
        if f"${{eval.sets[{i}].path}}" in deps or any(_inside(path, f) for f in folders):
            continue
        raise ParamsError(f"eval.sets[{i}] ({spec.get('name')}): its folder {path} is not a dep of the evalsets "
                          f"stage; put it under eval.root ({root}) or add `- ${{eval.sets[{i}].path}}` to its "
                          "deps in dvc.yaml")


def check_pool_source(params: dict, base: str | Path = ".") -> None:
    """Raise ParamsError when retrieval uses a service and `pool.source` (a DVC dep all the same:
    deps cannot be conditional) does not exist, naming the placeholder to use instead."""
    backend = (params.get("retrieve") or {}).get("backend", "pool")
    src = (params.get("pool") or {}).get("source")
    if backend == "pool" or src is None or os.path.exists(os.path.join(base, str(src))):
        return
    raise ParamsError(f"pool.source={src!r} does not exist: with retrieve.backend {backend} nothing reads it, "
                      "but dvc.yaml's pool stage depends on it; set pool.source: configs/no-pool (a placeholder)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/params.ok")
    ap.add_argument("--dvc-yaml", help="also check this dvc.yaml's evalsets deps against eval.sets")
    args = ap.parse_args(argv)
    params = load(args.params)
    if args.dvc_yaml:
        base = Path(args.dvc_yaml).resolve().parent
        check_evalsets_deps(params, yaml.safe_load(Path(args.dvc_yaml).read_text()), base=base)
        check_pool_source(params, base)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(OK)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))

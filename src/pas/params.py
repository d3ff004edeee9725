"""Loading and validating `params.yaml`.

Paper hyperparameters are top-level keys (`lambda_1`, `lambda_dup`, ...); everything else lives in
a section per stage or model family. Each consumer describes what it reads as a frozen dataclass and
builds it with :func:`build`, which refuses unknown keys and wrong types, naming the key. :func:`load`
validates the whole file up front, so a typo fails before any stage spends time.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml


class ParamsError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range. The message names the key."""


SEED_LIMIT = 2**32   # numpy's default_rng/RandomState and torch.manual_seed all take 0 <= seed < 2**32
INT_LIMIT = 2**63    # any int param must fit an int64 (numpy, torch and faiss take nothing larger)


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = True, hi_open: bool = True) -> None:
    """Raise ParamsError unless lo < value < hi (bounds closed where `*_open=False`); NaN and ±inf never
    pass (every comparison with NaN is False, so without this `lambda_dup: .nan` slips through)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"{name}={value!r} must be a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ParamsError(f"{name}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ParamsError(f"{name}={value!r} must be {'<' if hi_open else '<='} {hi}")


def check_seed(name: str, value: int) -> None:
    """Seeds go to numpy and torch, which agree only on 0 <= seed < 2**32."""
    check_range(name, value, 0, SEED_LIMIT, lo_open=False)


def unknown_key(prefix: str, key: Any, known: Iterable[Any], what: str = "unknown key") -> ParamsError:
    """The error for a key no schema knows: names it and the nearest valid key (most unknown keys are typos).

    `prefix` is the dotted path of the mapping holding it ("" for the top level, "pool.", ...)."""
    known = sorted(str(k) for k in known)
    near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"did you mean `{prefix}{near[0]}`?" if near else f"known: {', '.join(known)}"
    return ParamsError(f"{prefix}{key}: {what}; {hint}")


def _check_numbers(where: str, value: Any) -> None:
    """No NaN/inf and no int beyond int64 anywhere in a value (lists and nested mappings included)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"{where}={value!r} must be a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
        raise ParamsError(f"{where}={value!r} is out of range (an int param must fit in 64 bits)")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_numbers(f"{where}[{i}]", v)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_numbers(f"{where}.{k}", v)


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ParamsError(f"{name}={value!r} must be one of {choices}")


@dataclasses.dataclass(frozen=True)
class PaperParams:
    """The paper's hyperparameters (top-level keys of params.yaml)."""

    lambda_1: float = 0.01     # λ1: stop sampling L1 when |C_N \ C_{N-1}| < λ1·|C_{N-1}|
    lambda_2: float = 0.01     # λ2: stop expanding when |B_{i+1} \ B_i| < λ2·|B_i|
    lambda_dup: float = 0.6    # SSCD cosine above which two images are copies
    lambda_leak: float = 0.45  # SSCD cosine above which an image leaks an eval test image
    k_dup: int = 64            # neighbours searched per image for dedup
    k_leak: int = 32           # test-set neighbours searched per image for leakage
    k_retrieve: int = 500      # pool images retrieved per concept
    n_cap: int = 5             # captions written by L4 per concept
    n_synth: int = 35          # images generated per caption
    seed: int = 0              # one seed for every random choice of the run

    def __post_init__(self) -> None:
        for name in ("lambda_1", "lambda_2", "lambda_dup", "lambda_leak"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("k_dup", "k_leak", "k_retrieve"):
            check_range(name, getattr(self, name), 1, None, lo_open=False)
        for name in ("n_cap", "n_synth"):
            check_range(name, getattr(self, name), 0, None, lo_open=False)
        check_seed("seed", self.seed)


PAPER_KEYS = tuple(f.name for f in dataclasses.fields(PaperParams))

# section name -> "module:Class" of the dataclass that validates it. Imported lazily by `load`,
# so those modules must not import torch at module level.
SECTIONS: dict[str, str] = {}


def register(section: str, target: str) -> None:
    SECTIONS[section] = target


def _resolve(target: str) -> type:
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # YAML writes 1 for 1.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _coerce(value: Any, tp: Any) -> Any:
    if tp is float and isinstance(value, int):
        return float(value)
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def renamed(new: str, note: str = "") -> str:
    """The `REMOVED_KEYS` message of a key whose setting lives on under another name."""
    return f"now named `{new}`{note}; rename the key"


def build(cls: type, params: Mapping[str, Any], section: str | None = None):
    """Build dataclass `cls` from `params[section]`, falling back to top-level keys.

    Fields of `cls` that name paper keys are read from the top level; the rest from the section.
    Unknown keys in the section and values of the wrong type raise ParamsError naming `section.key`;
    a key listed in `cls.REMOVED_KEYS` (key -> where it went) gets that message instead.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    raw = params.get(section, {}) if section else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{section}: must be a mapping, got {type(raw).__name__}")
    misplaced = sorted(set(raw) & set(PAPER_KEYS))
    if misplaced:  # one value per paper symbol: a section copy would silently diverge
        raise ParamsError(f"{section}.{misplaced[0]}: paper hyperparameters are top-level keys; "
                          f"set `{misplaced[0]}` at the top of params.yaml")
    removed = sorted(set(raw) & set(getattr(cls, "REMOVED_KEYS", {})))
    if removed:   # a key of an older params.yaml: say where its setting went, not "did you mean"
        raise ParamsError(f"{section}.{removed[0]}: removed; {cls.REMOVED_KEYS[removed[0]]}")
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise unknown_key(f"{section}.", unknown[0], fields)
    kwargs = {}
    for name, f in fields.items():
        # a key read from the top level is named as such; a section's own key with its section
        where = f"{section}.{name}" if section and (name in raw or name not in PAPER_KEYS) else name
        if name in raw:
            value = raw[name]
        elif name in params and name in PAPER_KEYS:
            value = params[name]
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        else:
            raise ParamsError(f"{where}: missing")
        if not _type_ok(value, hints[name]):
            raise ParamsError(f"{where}={value!r}: expected {getattr(hints[name], '__name__', hints[name])}")
        _check_numbers(where, value)   # here, so every section and nested spec gets it
        kwargs[name] = _coerce(value, hints[name])
    try:
        return cls(**kwargs)
    except ParamsError as e:
        if section and not str(e).startswith(section):
            raise ParamsError(f"{section}.{e}") from None
        raise


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return data


def validate(params: Mapping[str, Any]) -> None:
    """Check every key of a params mapping; raises ParamsError naming the first bad key."""
    known = set(PAPER_KEYS) | set(SECTIONS)
    unknown = sorted(set(params) - known, key=str)
    if unknown:
        raise unknown_key("", unknown[0], known, "unknown top-level key")
    build(PaperParams, params)
    for section, target in SECTIONS.items():
        if section in params:
            build(_resolve(target), params, section)


def load(path: str | Path = "params.yaml") -> dict:
    """Read and validate params.yaml; returns the plain mapping."""
    params = read_yaml(path)
    validate(params)
    return params


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


def outside_repo_deps(params: dict, base: str | Path = ".") -> list[str]:
    """One line per input folder DVC depends on (`pool.source`, `eval.root`, set paths) that lies outside
    the repository at `base`. DVC (3.67) names such a dep relative to the repository in the workspace
    (`../../data/x`) but relative to `/` in a commit (`data/x`), so `dvc exp show` lists it as two
    changed columns on every row; a link inside the repository (the default `pools/openclipart`) has
    one name everywhere and the same hash."""
    base = Path(base).resolve()
    pool = params.get("pool") or {}
    ev = params.get("eval") or {}
    found = [("pool.source", pool.get("source")), ("eval.root", ev.get("root"))]
    found += [(f"eval.sets[{i}].path", s.get("path")) for i, s in enumerate(ev.get("sets") or [])]
    out = []
    for key, value in found:
        if value is None or not os.path.isabs(str(value)):
            continue          # relative paths are inside dvc.yaml's folder (or under eval.root)
        if not Path(os.path.abspath(str(value))).is_relative_to(base):
            out.append(f"{key}={value!r} is outside the repository: `dvc exp show` shows it as a changed "
                       f"dep between revisions; link it in (ln -s {value} pools/<name>) and name the link")
    return out


def check_dvc_yaml(params: dict, dvc_yaml: str | Path) -> None:
    """What params.yaml must satisfy against dvc.yaml beyond its own validation (the `params` stage and
    `pas check` run this): `check_evalsets_deps` and `check_pool_source`, relative to dvc.yaml's folder."""
    dvc_yaml = Path(dvc_yaml)
    base = dvc_yaml.resolve().parent
    check_evalsets_deps(params, yaml.safe_load(dvc_yaml.read_text()), base=base)
    check_pool_source(params, base)


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """One log format for every stage; pas at INFO, third-party libraries (open_clip, faiss's loader,
    diffusers, httpx, …) at WARNING. `PAS_LOG_LEVEL=DEBUG` (or INFO, …) sets every logger's level."""
    import logging
    import os

    level = os.environ.get("PAS_LOG_LEVEL", "").strip().upper()
    if level and not isinstance(logging.getLevelName(level), int):
        raise ParamsError(f"PAS_LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=level or "WARNING", format=LOG_FORMAT)
    logging.getLogger("pas").setLevel(level or "INFO")
    logging.getLogger("pas").propagate = True


def stage_parser(doc: str | None, metrics: str | None = None, params: bool = True):
    """The argument parser every stage script starts from: its docstring as `--help`, `--params`
    (params.yaml; not for a stage that reads none) and, for a stage that writes one, `--metrics`."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if params:
        ap.add_argument("--params", default="params.yaml", help="the params file (validated whole)")
    if metrics is not None:
        ap.add_argument("--metrics", default=metrics, help="the stage's metrics file")
    return ap


def run_stage(main: Callable[[], Any]) -> int:
    """The `__main__` of every stage script: `sys.exit(run_stage(main))`.

    Sets up logging (`setup_logging`: the stages' own `basicConfig` calls then change nothing).
    A config error is the user's to fix, not a bug: one line on stderr naming the key, exit status 2,
    no traceback. Any other error keeps its traceback. A `main` returning None counts as success."""
    try:
        setup_logging()
        rc = main()
    except ParamsError as e:   # subclasses may name their area (`models error: ...`)
        print(f"{getattr(e, 'prefix', 'params error')}: {e}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


register("models", "pas.models.specs:ModelsParams")
register("pool", "pas.data.pool:PoolParams")
register("ood", "pas.curate.ood:OodParams")
register("prune", "pas.curate.prune:PruneParams")
register("pretrain", "pas.train.pretrain:PretrainParams")
register("eval", "pas.train.evalsets:EvalParams")
register("domain", "pas.concepts.params:DomainParams")
register("llm", "pas.llm.base:LLMSection")
register("concepts", "pas.concepts.params:ConceptsParams")
register("retrieve", "pas.collect.retrieve:RetrieveParams")
register("captions", "pas.collect.captions:CaptionsParams")
register("generate", "pas.collect.generate:GenerateParams")
register("diffusion", "pas.collect.generate:DiffusionParams")
register("dedup", "pas.curate.dedup:DedupParams")
register("leakage", "pas.curate.leakage:LeakageParams")
register("precision", "pas.curate.precision:PrecisionParams")
register("report", "pas.report:ReportParams")

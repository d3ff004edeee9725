"""dvc.yaml lists, for every stage, the library code its script imports: a change to any module a
stage runs must make `dvc repro` rerun that stage (and only what depends on it).

The import closure is read statically (every `import pas...` / `from pas... import` in the script and,
recursively, in the modules it reaches, function-level imports included). `src/pas/params.py` is the one
exemption, stated in dvc.yaml: it validates params.yaml, whose values are tracked as params.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXEMPT = {"src/pas/params.py"}


def _module_file(name: str) -> Path | None:
    p = ROOT / "src" / Path(*name.split("."))
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def _imported(path: Path) -> set[Path]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "pas" or name.startswith("pas."):
                f = _module_file(name)
                if f is not None:
                    out.add(f)
    return out


def import_closure(script: Path, leaves: set[str] = frozenset()) -> set[str]:
    """Files of the pas modules `script` reaches; `leaves` (repo-relative paths) are not followed."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for f in _imported(todo.pop()):
            if f not in seen:
                seen.add(f)
                if str(f.relative_to(ROOT)) not in leaves:
                    todo.append(f)
    return {str(f.relative_to(ROOT)) for f in seen if f.name != "__init__.py" or _has_code(f)}


def _has_code(path: Path) -> bool:
    """False for a package marker holding only a docstring and `from __future__` imports."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        return True
    return False


def _fill(dep: str, key: str, item: dict) -> str:
    """A foreach dep with `${key}` / `${item.x}` filled in (other interpolations, e.g. params, stay)."""
    return re.sub(r"\$\{(key|item\.(\w+))\}", lambda m: key if m.group(1) == "key" else item[m.group(2)], dep)


def _stages() -> list[tuple[str, Path, list[str]]]:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    out = []
    for name, st in dvc["stages"].items():
        for key, item in (st["foreach"].items() if "foreach" in st else [(None, None)]):
            deps = [_fill(d, key, item) for d in st["do"]["deps"]] if key else list(st["deps"])
            scripts = [d for d in deps if d.startswith("stages/") and d.endswith(".py")]
            assert len(set(scripts)) == 1, f"{name}: expected one stages/*.py dep, got {scripts}"
            out.append((f"{name}@{key}" if key else name, ROOT / scripts[0], deps))
    return out


@functools.cache
def _model_stages() -> dict[str, dict]:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return {f"{name}@{k}": item for name in ("models", "pool_models") for k, item in dvc["stages"][name]["foreach"].items()}


def _top_level_imported(path: Path) -> set[str]:
    """Files of the pas modules that `path` imports at module level (not inside a function)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            f = _module_file(name) if name == "pas" or name.startswith("pas.") else None
            if f is not None:
                out.add(str(f.relative_to(ROOT)))
    return out


def expected_closure(name: str, script: Path) -> set[str]:
    """The pas files a stage runs. A `models@` / `pool_models@` stage runs pas.models.specs, which imports
    each family's builder module inside a function (and its trainer by name): its closure is the shared
    code, its own builder's closure and, in `pool_models`, its trainer's."""
    if name not in _model_stages():
        return import_closure(script)
    specs = "src/pas/models/specs.py"
    builders = {f"src/pas/models/{it['module']}.py" for it in _model_stages().values()}
    leaves = builders - _top_level_imported(ROOT / specs)     # specs imports llm's HUB_ID at the top
    item = _model_stages()[name]
    own = ROOT / f"src/pas/models/{item['module']}.py"
    closure = (import_closure(script, leaves=leaves) - leaves) | import_closure(own) | {str(own.relative_to(ROOT))}
    if "trainer" in item:
        trainer = ROOT / f"src/pas/models/{item['trainer']}.py"
        closure |= import_closure(trainer, leaves={specs}) | {str(trainer.relative_to(ROOT))}
    return closure


@pytest.mark.parametrize("name,script,deps", _stages(), ids=[s[0] for s in _stages()])
def test_every_imported_module_is_a_dep(name, script, deps):
    def covered(f: str) -> bool:
        return any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)

    closure = expected_closure(name, script)
    missing = sorted(f for f in closure - EXEMPT if not covered(f))
    assert not missing, f"stage {name} imports {missing} but dvc.yaml does not list them as deps"


def test_the_closure_finds_function_level_imports():
    # leakage imports pas.engine and pas.data.chunks inside functions only
    closure = import_closure(ROOT / "stages" / "leakage.py")
    assert {"src/pas/engine.py", "src/pas/data/chunks.py", "src/pas/curate/leakage.py"} <= closure


def test_library_deps_are_exactly_the_imports():
    """Not only a superset: a dep on code a stage never imports reruns it for nothing, and a folder dep
    (src/pas/io) reruns every stage on any edit in it. Each stage's src/**/*.py deps are its import
    closure; data files under src/ (prompts, class lists) stay listed as the files the code reads. The
    `params` stage depends on the validators of pas.params.SECTIONS (tests/test_dvc_params.py)."""
    wrong = {}
    for name, script, deps in _stages():
        if name == "params":
            continue
        src = {d for d in deps if d.startswith("src/") and (d.endswith(".py") or "." not in Path(d).name)}
        want = expected_closure(name, script) - EXEMPT
        if src != want:
            wrong[name] = {"extra": sorted(src - want), "missing": sorted(want - src)}
    assert not wrong, wrong


def test_fetched_models_do_not_depend_on_pool_or_training_code():
    """An edit to the engine, the pool or a trainer must not re-download the LLM, diffusion, text
    embedder, backbone init or CLIPN (≈ 125 GB in the paper presets): only `pool_models` depend on it."""
    heavy = {"src/pas/engine.py", "src/pas/data/pool.py", "src/pas/io/shards.py", "src/pas/models/pool_pairs.py",
             "src/pas/models/clip_train.py", "src/pas/models/sscd_train.py", "src/pas/train/schedule.py"}
    stages = {name: deps for name, _, deps in _stages()}
    fetched = sorted(n for n in stages if n.startswith("models@"))
    assert fetched == ["models@backbone_init", "models@clipn", "models@diffusion", "models@llm", "models@text_embed"]
    for name in fetched:
        assert not heavy & set(stages[name]), (name, sorted(heavy & set(stages[name])))
    for name in ("pool_models@clip", "pool_models@sscd"):
        assert heavy - {"src/pas/models/sscd_train.py" if name.endswith("clip") else "src/pas/models/clip_train.py"} \
            <= set(stages[name]), name

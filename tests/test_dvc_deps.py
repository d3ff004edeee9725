"""dvc.yaml lists, for every stage, the library code its script imports: a change to any module a
stage runs must make `dvc repro` rerun that stage (and only what depends on it).

The import closure is read statically (every `import pas...` / `from pas... import` in the script and,
recursively, in the modules it reaches, function-level imports included). `src/pas/params.py` is the one
exemption, stated in dvc.yaml: it validates params.yaml, whose values are tracked as params.
"""

from __future__ import annotations

import ast
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


def _stages() -> list[tuple[str, Path, list[str]]]:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    out = []
    for name, st in dvc["stages"].items():
        if "foreach" in st:
            for key, item in st["foreach"].items():
                deps = [d.replace("${key}", key).replace("${item.module}", item["module"])
                        .replace("${item.family}", item["family"]) for d in st["do"]["deps"]]
                out.append((f"{name}@{key}", ROOT / "stages" / f"{name}.py", deps))
        else:
            scripts = [d for d in st.get("deps", []) if d.startswith("stages/") and d.endswith(".py")]
            assert len(scripts) == 1, f"{name}: expected one stages/*.py dep, got {scripts}"
            out.append((name, ROOT / scripts[0], list(st["deps"])))
    return out


@pytest.mark.parametrize("name,script,deps", _stages(), ids=[s[0] for s in _stages()])
def test_every_imported_module_is_a_dep(name, script, deps):
    def covered(f: str) -> bool:
        return any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)

    if name.startswith("models@"):
        # specs.resolve imports only the family's module, in a function; the rest of that module's
        # imports serve its loaders, not the builder this stage runs, so the closure stops there
        module = next(d for d in deps if d.startswith("src/pas/models/") and d.endswith(".py")
                      and not d.endswith(("specs.py", "files.py", "hub.py")))
        families = {str(p.relative_to(ROOT)) for p in (ROOT / "src/pas/models").glob("*.py")
                    if p.name not in ("specs.py", "files.py", "hub.py", "__init__.py")}
        closure = (import_closure(script, leaves=families) - families) | {module}
    else:
        closure = import_closure(script)
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
    models foreach shares one dep list among its families (covered by the test above), and `params`
    depends on the validators of pas.params.SECTIONS (tests/test_dvc_params.py)."""
    wrong = {}
    for name, script, deps in _stages():
        if name.startswith("models@") or name == "params":
            continue
        src = {d for d in deps if d.startswith("src/") and (d.endswith(".py") or "." not in Path(d).name)}
        want = import_closure(script) - EXEMPT
        if src != want:
            wrong[name] = {"extra": sorted(src - want), "missing": sorted(want - src)}
    assert not wrong, wrong

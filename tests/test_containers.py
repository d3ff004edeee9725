"""containers/: the Apptainer definition files (parsed with spython's recipe parser), the stage→family
mapping they declare, the stack check their %test runs (on CPU here), and containers/build (with
tests/fake_apptainer.py standing in for apptainer)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from spython.main.parse.parsers import SingularityParser

REPO = Path(__file__).resolve().parents[1]
CONTAINERS = REPO / "containers"
FAKE = Path(__file__).resolve().parent / "fake_apptainer.py"
FAMILIES = ("diffusion", "llm", "vision")
SECTIONS = ("%files", "%post", "%environment", "%runscript", "%test", "%labels", "%help")
# which container runs each GPU stage of dvc.yaml (models: one foreach item each)
STAGE_FAMILY = {
    "pool_models@clip": "vision", "pool_models@sscd": "vision", "models@backbone_init": "vision",
    "models@clipn": "vision", "models@diffusion": "diffusion", "models@llm": "llm", "models@text_embed": "llm",
    "pool": "vision", "concepts": "llm", "captions": "llm", "retrieve": "vision", "generate": "diffusion",
    "dedup": "vision", "leakage": "vision", "ood": "vision", "pretrain": "vision", "evaluate": "vision",
}
DIGEST = re.compile(r"@sha256:([0-9a-f]{64})$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)$")


def def_path(family: str) -> Path:
    return CONTAINERS / f"{family}.def"


def recipe(family: str):
    layers = SingularityParser(str(def_path(family))).recipe
    assert len(layers) == 1, f"{family}.def parsed as several stages: {list(layers)}"
    return next(iter(layers.values()))


def section_text(family: str, name: str) -> str:
    """The raw body of one section (up to the next line starting with %)."""
    body, inside = [], False
    for line in def_path(family).read_text().splitlines():
        if line.startswith("%"):
            inside = line.split()[0] == name
            continue
        if inside:
            body.append(line)
    return "\n".join(body) + "\n"


def labels(family: str) -> dict:
    return dict(line.split(None, 1) for line in recipe(family).labels)


def pins(family: str, var: str = "PAS_PIP") -> list[str]:
    """The requirements listed in `VAR="..."` in %post."""
    post = section_text(family, "%post")
    m = re.search(rf'^\s*{var}="([^"]*)"', post, re.M)
    assert m, f"{family}.def: no {var}=\"...\" list in %post"
    return m.group(1).split()


def test_definition_files_are_exactly_the_families():
    assert sorted(p.stem for p in CONTAINERS.glob("*.def")) == list(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_header_is_docker_base_pinned_by_digest(family):
    lines = [ln for ln in def_path(family).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "Bootstrap: docker"
    assert lines[1].startswith("From: ")
    base = recipe(family).fromHeader
    m = DIGEST.search(base)
    assert m, f"{family}.def: base image {base!r} is not pinned by digest"
    lab = labels(family)
    assert lab["org.opencontainers.image.base.digest"] == f"sha256:{m.group(1)}"
    # the human-readable tag is recorded next to the digest, and names the same repository
    name, tag = lab["org.opencontainers.image.base.name"].rsplit(":", 1)
    assert re.fullmatch(r"v?[0-9][0-9.]*(-py3)?", tag), tag
    assert name.endswith(base.split("@")[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_section_is_present_once(family):
    heads = [ln.split()[0] for ln in def_path(family).read_text().splitlines() if ln.startswith("%")]
    assert sorted(heads) == sorted(SECTIONS)


@pytest.mark.parametrize("family", FAMILIES)
def test_parsed_sections_have_content(family):
    r = recipe(family)
    env = {e.split("=", 1)[0]: e.split("=", 1)[1] for e in r.environ if not e.startswith("#")}
    assert env["HF_HOME"] == '"${HF_HOME:-$HOME/.cache/huggingface}"'   # the host's cache wins
    assert env["PYTHONPATH"] == '"${PYTHONPATH:-/opt/pas/src}"'          # run-in's working tree wins
    assert env["PYTHONNOUSERSITE"] == "1"
    assert env["PAS_IN_CONTAINER"] == family
    assert r.files == ["src /opt/pas/src", "containers/check_stack.py /opt/pas/check_stack.py"]
    assert r.test and r.cmd and len(r.install) > 20
    assert labels(family)["pas.family"] == family
    assert f"containers/build {family}" in section_text(family, "%help")


@pytest.mark.parametrize("family", FAMILIES)
def test_files_sources_exist_relative_to_the_repo_root(family):
    for line in recipe(family).files:
        src, _dst = line.split()
        assert (REPO / src).exists(), src


@pytest.mark.parametrize("family", FAMILIES)
def test_test_section_checks_cuda_and_the_stack(family):
    body = section_text(family, "%test")
    assert "assert torch.cuda.is_available()" in body
    assert f"python3 /opt/pas/check_stack.py {family} --device cuda" in body


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("section", ["%post", "%test", "%environment", "%runscript"])
def test_shell_sections_are_valid_posix_sh(family, section):
    r = subprocess.run(["sh", "-n"], input=section_text(family, section), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("family", FAMILIES)
def test_python_packages_are_pinned_and_never_replace_the_base_torch(family):
    reqs = pins(family) + pins(family, "PAS_PIP_NODEPS")
    assert reqs
    for req in reqs:
        m = PIN.match(req)
        assert m, f"{family}.def: {req!r} is not pinned as name==version"
        name = canonicalize_name(m.group(1))
        assert name not in {"torch", "torchvision", "torchaudio", "vllm"}, f"{req}: comes from the base image"
        assert not name.startswith("nvidia-"), req


def test_pins_agree_across_families_and_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(r).name): Requirement(r).specifier
                for r in project["dependencies"]}
    seen = {}
    for family in FAMILIES:
        for req in pins(family) + pins(family, "PAS_PIP_NODEPS"):
            name, version = PIN.match(req).groups()
            name = canonicalize_name(name)
            assert seen.setdefault(name, version) == version, f"{name}: {seen[name]} vs {version} ({family})"
            if name in declared:
                assert declared[name].contains(version, prereleases=True), (family, req, declared[name])


# what each image's base brings (so its .def does not pip-install it); the stack's extra pins it
BASE_PROVIDED = {"llm": {"vllm"}, "diffusion": {"torch", "torchvision"}, "vision": {"torch", "torchvision"}}
# import name (containers/check_stack.py) -> distribution that provides it
PROVIDES = {"yaml": "pyyaml", "PIL": "pillow", "sentence_transformers": "sentence-transformers",
            "open_clip": "open-clip-torch", "faiss": "faiss-gpu", "rapidocr_onnxruntime": "rapidocr-onnxruntime"}


def extra(family: str) -> dict[str, str]:
    """pyproject's `[project.optional-dependencies].<family>`: {canonical name: pinned version}."""
    reqs = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][family]
    out = {}
    for r in reqs:
        m = PIN.match(r)
        assert m, f"pyproject {family} extra: {r!r} is not pinned as name==version"
        out[canonicalize_name(m.group(1))] = m.group(2)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_extra_and_def_name_the_same_packages(family):
    """One recipe per stack: the extra (scripts/install.sh --stack) is the .def's list plus what the
    image's base brings, same versions."""
    in_def = {canonicalize_name(PIN.match(r).group(1)): PIN.match(r).group(2) for r in pins(family)}
    ext = extra(family)
    assert set(ext) - BASE_PROVIDED[family] == set(in_def), (set(ext) ^ set(in_def)) - BASE_PROVIDED[family]
    assert {k: ext[k] for k in in_def} == in_def
    assert BASE_PROVIDED[family] <= set(ext)
    # the packages installed without their dependencies: the .def's list and install.sh's agree
    install = (REPO / "scripts" / "install.sh").read_text()
    assert all(f'"{r}"' in install for r in pins(family, "PAS_PIP_NODEPS"))


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_check_imports_come_from_the_stack(family):
    sys.path.insert(0, str(CONTAINERS))
    try:
        import check_stack
    finally:
        sys.path.remove(str(CONTAINERS))
    ext = set(extra(family)) | {canonicalize_name(PIN.match(r).group(1)) for r in pins(family, "PAS_PIP_NODEPS")}
    for module in check_stack.COMMON + check_stack.STACKS[family]:
        top = module.split(".")[0]
        if top == "pas":
            continue
        assert canonicalize_name(PROVIDES.get(top, top)) in ext, f"{family}: `import {module}` has no package"


def test_the_vllm_pin_is_the_base_images():
    assert extra("llm")["vllm"] == labels("llm")["org.opencontainers.image.base.name"].rsplit(":v", 1)[1]
    # the vision stack's faiss is the GPU build under its PyPI name (faiss-gpu, as faiss-cpu's pin)
    assert "faiss-gpu" in extra("vision") and "faiss-gpu-cu12" not in extra("vision")


def test_each_family_pins_its_stack():
    need = {"llm": {"sentence-transformers", "gguf", "accelerate"},
            "diffusion": {"diffusers", "transformers", "open-clip-torch"},
            "vision": {"open-clip-torch", "faiss-gpu", "timm", "lightly", "rapidocr-onnxruntime"}}
    common = {"pandas", "pyarrow", "pyyaml", "tqdm", "webdataset", "huggingface-hub"}
    for family in FAMILIES:
        names = {canonicalize_name(PIN.match(r).group(1)) for r in pins(family)}
        assert need[family] | common <= names, (family, (need[family] | common) - names)


def test_llm_image_comes_from_vllm_and_serves_it():
    assert recipe("llm").fromHeader.startswith("vllm/vllm-openai@sha256:")
    assert recipe("llm").cmd == 'exec vllm serve "$@"'
    for family in ("diffusion", "vision"):
        assert recipe(family).fromHeader.startswith("nvcr.io/nvidia/pytorch@sha256:")


def test_every_gpu_stage_has_exactly_one_family():
    declared = {}
    for family in FAMILIES:
        for stage in labels(family)["pas.stages"].split():
            assert stage not in declared, f"{stage} in {declared.get(stage)} and {family}"
            declared[stage] = family
    assert declared == STAGE_FAMILY


def test_check_stack_knows_the_same_families():
    sys.path.insert(0, str(CONTAINERS))
    try:
        import check_stack
    finally:
        sys.path.remove(str(CONTAINERS))
    assert sorted(check_stack.STACKS) == sorted(check_stack.CHECKS) == list(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_stack_check_runs_on_cpu(family):
    """What %test runs on CUDA, run here on CPU (vLLM and faiss GPU indexes skipped): tiny models of
    each library really run, so an API change in a pinned version fails here, not on the cluster."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(CONTAINERS / "check_stack.py"), family, "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith(f"{family} stack ok on cpu")


# ---------------------------------------------------------------- containers/build


class BuildSandbox:
    """A temporary repo with containers/build, the .def files and stages/run-in; PATH has only the
    tools the script uses, the fake apptainer, and optionally a fake nvidia-smi."""

    TOOLS = ("bash", "sh", "sed", "dirname", "rm", "mv", "sha256sum", "cat", "env")

    def __init__(self, tmp: Path):
        self.root = Path(os.path.realpath(tmp / "repo"))
        (self.root / "containers").mkdir(parents=True)
        (self.root / "stages").mkdir()
        shutil.copy2(CONTAINERS / "build", self.root / "containers" / "build")
        shutil.copy2(REPO / "stages" / "run-in", self.root / "stages" / "run-in")
        for family in FAMILIES:
            shutil.copy2(def_path(family), self.root / "containers" / f"{family}.def")
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for tool in self.TOOLS:
            (self.bin / tool).symlink_to(shutil.which(tool))
        (self.bin / "python3").symlink_to(sys.executable)
        fake = self.bin / "apptainer"
        fake.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
        fake.chmod(0o755)
        self.log = tmp / "calls.jsonl"

    def gpu(self, present: bool):
        smi = self.bin / "nvidia-smi"
        smi.write_text("#!/bin/sh\n" + ("echo 'GPU 0: fake'\n" if present else "exit 9\n"))
        smi.chmod(0o755)

    def run(self, *args, apptainer=True, cwd=None, **extra):
        path = self.bin
        if not apptainer:
            (self.bin / "apptainer").unlink()
        env = {"PATH": str(path), "FAKE_APPTAINER_LOG": str(self.log), "HOME": str(self.root), **extra}
        return subprocess.run([str(self.root / "containers" / "build"), *args], env=env,
                              cwd=cwd or self.root, capture_output=True, text=True, timeout=60)

    def calls(self):
        return [json.loads(x) for x in self.log.read_text().splitlines()] if self.log.exists() else []

    def built(self):
        return sorted(p.name for p in (self.root / "containers").iterdir() if not p.name.endswith((".def", "build")))


@pytest.fixture
def bs(tmp_path):
    return BuildSandbox(tmp_path)


def test_build_one_family(bs, tmp_path):
    r = bs.run("--no-test", "vision", cwd=tmp_path)            # any current directory: it cds to the root
    assert r.returncode == 0, r.stderr
    assert bs.calls() == [["build", "--notest", "containers/.vision.sif.partial", "containers/vision.def"]]
    assert bs.built() == ["vision.sif", "vision.sif.def.sha256"]
    record = (bs.root / "containers" / "vision.sif.def.sha256").read_text().split()
    assert record == [hashlib.sha256(def_path("vision").read_bytes()).hexdigest(), "containers/vision.def"]


def test_build_fakeroot_with_test(bs):
    r = bs.run("--fakeroot", "--test", "llm")
    assert r.returncode == 0, r.stderr
    assert bs.calls() == [["build", "--fakeroot", "--notest", "containers/.llm.sif.partial", "containers/llm.def"],
                          ["test", "--nv", "containers/.llm.sif.partial"]]
    assert bs.built() == ["llm.sif", "llm.sif.def.sha256"]


@pytest.mark.parametrize("args", [[], ["all"]])
def test_build_all_families(bs, args):
    bs.gpu(False)
    r = bs.run(*args)
    assert r.returncode == 0, r.stderr
    assert [c[-1] for c in bs.calls()] == [f"containers/{f}.def" for f in FAMILIES]
    assert "%test skipped (no GPU here)" in r.stderr
    assert bs.built() == sorted(f"{f}.sif{x}" for f in FAMILIES for x in ("", ".def.sha256"))


@pytest.mark.parametrize("gpu", [True, False])
def test_build_runs_test_when_a_gpu_is_visible(bs, gpu):
    bs.gpu(gpu)
    r = bs.run("diffusion")
    assert r.returncode == 0, r.stderr
    assert [c[0] for c in bs.calls()] == (["build", "test"] if gpu else ["build"])


def test_failed_test_keeps_the_old_image(bs):
    old = bs.root / "containers" / "vision.sif"
    old.write_text("old image")
    r = bs.run("--test", "vision", FAKE_APPTAINER_TEST_RC="1")
    assert r.returncode == 2 and "vision: %test failed" in r.stderr
    assert old.read_text() == "old image"
    assert bs.built() == ["vision.sif"]                          # no partial, no new record


def test_failed_build_leaves_nothing(bs):
    r = bs.run("--no-test", "llm", FAKE_APPTAINER_BUILD_RC="1")
    assert r.returncode == 1
    assert bs.built() == []


def test_build_errors(bs):
    r = bs.run("audio")
    assert r.returncode == 2 and "unknown family 'audio'" in r.stderr
    r = bs.run("--bogus")
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
    r = bs.run("vision", apptainer=False)
    assert r.returncode == 2 and "apptainer is not on PATH" in r.stderr
    assert bs.calls() == []


def test_built_image_is_used_by_run_in_until_its_def_changes(bs):
    r = bs.run("--no-test", "vision")
    assert r.returncode == 0, r.stderr
    run_in = [str(bs.root / "stages" / "run-in"), "vision", "--", "sh", "-c", "echo in"]
    env = {"PATH": str(bs.bin), "FAKE_APPTAINER_LOG": str(bs.log), "HOME": str(bs.root)}
    r = subprocess.run(run_in, env=env, cwd=bs.root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "in\n"
    assert r.stderr.startswith("run-in: vision: container: ") and "warning" not in r.stderr
    assert bs.calls()[-1][0] == "exec"
    with open(bs.root / "containers" / "vision.def", "a") as f:
        f.write("\n# changed\n")
    r = subprocess.run(run_in, env=env, cwd=bs.root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "was built from another containers/vision.def" in r.stderr

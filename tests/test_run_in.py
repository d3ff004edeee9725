"""stages/run-in: container vs native, the exact apptainer command line, pass-through of exit codes,
signals and arguments. Apptainer is replaced by tests/fake_apptainer.py (records argv, then execs the
command like the real one), put first on PATH; each test runs a copy of run-in in a temporary repo."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_IN = REPO / "stages" / "run-in"
FAKE = Path(__file__).resolve().parent / "fake_apptainer.py"
FAMILIES = ("diffusion", "llm", "vision")
TRICKY = ["a b", "it's", '"q"', "", "--", "$HOME", "*", "back\\slash", "new\nline", "ünï", "-c", "x=1,y=2"]
ECHO_ARGV = ["python3", "-c", "import sys, json; sys.stdout.write(json.dumps(sys.argv[1:]))"]


class Sandbox:
    """A temporary repo (stages/run-in, containers/*.def, src/) and a PATH holding only python3 and sh,
    plus the fake apptainer when `with_apptainer`."""

    def __init__(self, tmp: Path):
        self.root = Path(os.path.realpath(tmp / "repo"))
        (self.root / "stages").mkdir(parents=True)
        (self.root / "containers").mkdir()
        (self.root / "src").mkdir()
        shutil.copy2(RUN_IN, self.root / "stages" / "run-in")
        for fam in FAMILIES:
            shutil.copy2(REPO / "containers" / f"{fam}.def", self.root / "containers" / f"{fam}.def")
        self.bin = tmp / "bin"
        self.bin.mkdir()
        (self.bin / "python3").symlink_to(sys.executable)
        (self.bin / "sh").symlink_to(shutil.which("sh"))
        self.fakebin = tmp / "fakebin"
        self.fakebin.mkdir()
        fake = self.fakebin / "apptainer"
        fake.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
        fake.chmod(0o755)
        self.log = tmp / "apptainer-calls.jsonl"
        self.home = tmp / "home"
        self.home.mkdir()
        self.outside = Path(os.path.realpath(tmp))

    def sif(self, family="vision") -> Path:
        p = self.root / "containers" / f"{family}.sif"
        p.write_text("image")
        return p

    def env(self, with_apptainer: bool, **extra) -> dict:
        path = [str(self.fakebin)] if with_apptainer else []
        env = {"PATH": os.pathsep.join(path + [str(self.bin)]), "HOME": str(self.home),
               "FAKE_APPTAINER_LOG": str(self.log)}
        env.update(extra)
        return env

    def argv(self, family, cmd):
        return [str(self.root / "stages" / "run-in"), family, "--", *cmd]

    def run(self, family, cmd, with_apptainer=True, cwd=None, **extra):
        return subprocess.run(self.argv(family, cmd), env=self.env(with_apptainer, **extra),
                              cwd=cwd or self.root, capture_output=True, text=True, timeout=60)

    def calls(self) -> list:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def sb(tmp_path):
    return Sandbox(tmp_path)


@pytest.fixture(params=["native", "container"])
def mode(request, sb):
    """Both ways through run-in: native (no apptainer) and container (fake apptainer + built .sif)."""
    if request.param == "container":
        sb.sif("vision")
    return request.param


def _with_apptainer(mode):
    return mode == "container"


def test_run_in_is_an_executable_python_script():
    assert os.access(RUN_IN, os.X_OK)
    assert RUN_IN.read_text().startswith("#!/usr/bin/env python3\n")


def test_exact_apptainer_command_line(sb, tmp_path):
    sif = sb.sif("vision")
    hf = sb.outside / "hf-cache"                     # outside the repo: bound, created if missing
    r = sb.run("vision", ["python3", "-c", "import os; print(os.getcwd()); print(os.environ['PYTHONPATH'])"],
               PAS_SEED="3", PAS_CONTAINERS="1", HF_HOME=str(hf), HF_HUB_OFFLINE="1", OTHER="x")
    assert r.returncode == 0, r.stderr
    root = str(sb.root)
    assert sb.calls() == [[
        "exec", "--nv", "--bind", root, "--pwd", root, "--bind", str(hf),
        "--env", f"PYTHONPATH={root}/src", "--env", "PAS_CONTAINERS=1", "--env", "PAS_SEED=3",
        "--env", "HF_HUB_OFFLINE=1", "--env", f"HF_HOME={hf}",
        str(sif), "python3", "-c", "import os; print(os.getcwd()); print(os.environ['PYTHONPATH'])"]]
    assert hf.is_dir()
    assert r.stdout.splitlines() == [root, f"{root}/src"]
    # one log line, showing the command line
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("run-in: vision: container: ")


def test_native_when_apptainer_is_absent(sb):
    sb.sif("vision")
    r = sb.run("vision", ["sh", "-c", "echo ran"], with_apptainer=False)
    assert r.returncode == 0 and r.stdout == "ran\n"
    assert r.stderr == "run-in: vision: running natively (no apptainer on PATH)\n"
    assert sb.calls() == []


def test_native_when_image_is_not_built(sb):
    r = sb.run("llm", ["sh", "-c", "echo ran"])
    assert r.returncode == 0 and r.stdout == "ran\n"
    assert r.stderr == "run-in: llm: running natively (containers/llm.sif not built (containers/build llm))\n"
    assert sb.calls() == []


def test_native_uses_the_stack_venv_when_installed(sb):
    """`scripts/install.sh --stack llm` makes .venv-llm (vLLM's own torch): natively, `python` is its."""
    bin_ = sb.root / ".venv-llm" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text("#!/bin/sh\necho \"stack python $PYTHONPATH $VIRTUAL_ENV\"\n")
    (bin_ / "python").chmod(0o755)
    r = sb.run("llm", ["python", "stages/concepts.py"], with_apptainer=False, PYTHONPATH="/x")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"stack python {sb.root}/src:/x {sb.root}/.venv-llm\n"
    assert r.stderr == "run-in: llm: running natively (no apptainer on PATH; in .venv-llm)\n"
    other = sb.run("vision", ["sh", "-c", "command -v python || echo none"], with_apptainer=False)
    assert other.stdout == "none\n"                   # another family: untouched


def test_pas_containers_0_forces_native(sb):
    sb.sif("vision")
    r = sb.run("vision", ["sh", "-c", "echo ran"], PAS_CONTAINERS="0")
    assert r.returncode == 0 and r.stdout == "ran\n"
    assert "running natively (PAS_CONTAINERS=0)" in r.stderr
    assert sb.calls() == []


def test_inside_a_container_runs_natively(sb):
    sb.sif("vision")
    r = sb.run("vision", ["sh", "-c", "echo ran"], PAS_IN_CONTAINER="vision", PAS_CONTAINERS="1")
    assert r.returncode == 0 and r.stdout == "ran\n"
    assert "already inside the vision container" in r.stderr
    assert sb.calls() == []


def test_forced_without_apptainer_fails_clearly(sb):
    sb.sif("vision")
    marker = sb.outside / "ran"
    r = sb.run("vision", ["sh", "-c", f"touch {marker}"], with_apptainer=False, PAS_CONTAINERS="1")
    assert r.returncode == 2
    assert "PAS_CONTAINERS=1" in r.stderr and "`apptainer` is not on PATH" in r.stderr
    assert not marker.exists()


def test_forced_without_image_fails_clearly(sb):
    marker = sb.outside / "ran"
    r = sb.run("diffusion", ["sh", "-c", f"touch {marker}"], PAS_CONTAINERS="1")
    assert r.returncode == 2
    assert "containers/diffusion.sif is missing" in r.stderr and "containers/build diffusion" in r.stderr
    assert not marker.exists() and sb.calls() == []


@pytest.mark.parametrize("value", ["yes", "2", "container"])
def test_bad_pas_containers_value(sb, value):
    r = sb.run("vision", ["sh", "-c", "echo ran"], PAS_CONTAINERS=value)
    assert r.returncode == 2 and r.stdout == ""
    assert f"PAS_CONTAINERS={value!r}" in r.stderr


def test_unknown_family(sb):
    r = sb.run("audio", ["sh", "-c", "echo ran"])
    assert r.returncode == 2 and r.stdout == ""
    assert "unknown container family 'audio'" in r.stderr and "diffusion, llm, vision" in r.stderr


def test_families_are_the_def_files(sb):
    (sb.root / "containers" / "extra.def").write_text("Bootstrap: docker\nFrom: busybox\n")
    r = sb.run("extra", ["sh", "-c", "echo ran"])
    assert r.returncode == 0 and r.stdout == "ran\n"


@pytest.mark.parametrize("argv", [["vision"], ["vision", "--"], ["vision", "sh", "-c", "true"], []])
def test_usage_errors(sb, argv):
    r = subprocess.run([str(sb.root / "stages" / "run-in"), *argv], env=sb.env(True), cwd=sb.root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage: stages/run-in <family> -- <command>" in r.stderr


def test_help(sb):
    r = subprocess.run([str(sb.root / "stages" / "run-in"), "--help"], env=sb.env(True),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "stages/run-in <family> -- <command>" in r.stdout


def test_exit_code_passes_through(sb, mode):
    r = sb.run("vision", ["sh", "-c", "exit 7"], with_apptainer=_with_apptainer(mode))
    assert r.returncode == 7
    assert len(sb.calls()) == (1 if mode == "container" else 0)


def test_arguments_pass_unchanged(sb, mode):
    r = sb.run("vision", ECHO_ARGV + TRICKY, with_apptainer=_with_apptainer(mode))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == TRICKY
    if mode == "container":
        assert sb.calls()[0][-len(ECHO_ARGV + TRICKY):] == ECHO_ARGV + TRICKY


def test_death_by_signal_passes_through_like_a_direct_run(sb, mode):
    cmd = ["sh", "-c", "kill -TERM $$"]
    direct = subprocess.run(cmd, env=sb.env(False), capture_output=True, timeout=60)
    r = sb.run("vision", cmd, with_apptainer=_with_apptainer(mode))
    assert direct.returncode == -signal.SIGTERM
    assert r.returncode == direct.returncode


def test_run_in_becomes_the_command(sb, mode):
    """exec, not a child: the command has run-in's pid, so a signal sent to run-in reaches it."""
    code = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(30)"
    p = subprocess.Popen(sb.argv("vision", ["python3", "-c", code]), env=sb.env(_with_apptainer(mode)),
                         cwd=sb.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert int(p.stdout.readline()) == p.pid
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == -signal.SIGTERM
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()


def test_native_command_not_found(sb):
    r = sb.run("vision", ["no-such-command-here", "x"], with_apptainer=False)
    assert r.returncode == 127 and "command not found: no-such-command-here" in r.stderr


def test_values_apptainer_would_split_go_through_apptainerenv(sb):
    sb.sif("vision")
    code = "import os; print(os.environ['PAS_LIST']); print(os.environ['PAS_QUOTE']); print(os.environ['PAS_OK'])"
    r = sb.run("vision", ["python3", "-c", code], PAS_LIST="a,b", PAS_QUOTE='say "x"', PAS_OK="a=b c")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["a,b", 'say "x"', "a=b c"]
    flags = sb.calls()[0]
    assert "PAS_OK=a=b c" in flags
    assert not any(a.startswith(("PAS_LIST=", "PAS_QUOTE=")) for a in flags)


def test_cache_dirs_inside_the_repo_are_not_bound_again_and_relative_ones_become_absolute(sb):
    sb.sif("vision")
    r = sb.run("vision", ["sh", "-c", "true"], HF_HOME=".hf", TORCH_HOME=str(sb.outside / "torch"))
    assert r.returncode == 0, r.stderr
    call = sb.calls()[0]
    binds = [call[i + 1] for i, a in enumerate(call) if a == "--bind"]
    assert binds == [str(sb.root), str(sb.outside / "torch")]
    assert f"HF_HOME={sb.root}/.hf" in call and f"TORCH_HOME={sb.outside}/torch" in call
    assert (sb.root / ".hf").is_dir()


def test_uncreatable_cache_dir_fails_clearly(sb):
    sb.sif("vision")
    blocker = sb.outside / "a-file"
    blocker.write_text("")
    r = sb.run("vision", ["sh", "-c", "true"], HF_HOME=str(blocker / "hf"))
    assert r.returncode == 2 and f"HF_HOME={blocker}/hf: cannot create the cache directory" in r.stderr
    assert sb.calls() == []


def test_pas_bind_adds_bind_mounts(sb):
    sb.sif("vision")
    r = sb.run("vision", ["sh", "-c", "true"], PAS_BIND="/scratch/data:/data:ro,/datasets")
    assert r.returncode == 0, r.stderr
    call = sb.calls()[0]
    i = call.index("/scratch/data:/data:ro,/datasets")
    assert call[i - 1] == "--bind"


def test_warns_when_the_image_was_built_from_another_def(sb):
    sb.sif("vision")
    record = sb.root / "containers" / "vision.sif.def.sha256"
    record.write_text("0" * 64 + "  containers/vision.def\n")
    r = sb.run("vision", ["sh", "-c", "true"])
    assert r.returncode == 0
    assert "containers/vision.sif was built from another containers/vision.def" in r.stderr
    digest = hashlib.sha256((sb.root / "containers" / "vision.def").read_bytes()).hexdigest()
    record.write_text(digest + "  containers/vision.def\n")
    r = sb.run("vision", ["sh", "-c", "true"])
    assert r.returncode == 0 and "warning" not in r.stderr


def test_runs_from_a_subdirectory_with_the_repo_as_working_directory(sb):
    sb.sif("vision")
    sub = sb.root / "src"
    r = sb.run("vision", ["python3", "-c", "import os; print(os.getcwd())"], cwd=sub)
    assert r.returncode == 0 and r.stdout.strip() == str(sb.root)

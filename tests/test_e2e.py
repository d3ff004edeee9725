"""The whole DAG, offline, as a user runs it: `dvc repro` in a fresh clone, then the workflows around it
(status, no-op repro, an ablation, publishing to S3 and pulling the final dataset into a new clone)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from tests.dvc_helpers import make_repo, ran_stages, run
from tests.helpers import file_digests

ROOT = Path(__file__).resolve().parents[1]

ALL = ["params", "pool_models@clip", "pool_models@sscd", "models@diffusion", "models@llm", "models@text_embed",
       "models@backbone_init", "models@clipn", "pool", "concepts", "retrieve", "captions", "generate", "evalsets",
       "dedup",
       "leakage", "ood", "prune", "pretrain", "evaluate", "summary", "precision", "report"]
AFTER_DEDUP = ["params", "dedup", "leakage", "ood", "prune", "pretrain", "evaluate", "summary", "precision",
               "report"]   # params: the check


def _metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / f"{name}.json").read_text())


def lock_mismatches(committed: dict, fresh: dict) -> tuple[list[str], list[str]]:
    """(stale, differing) between two dvc.lock mappings: `stale` = stages whose deps or params differ
    (the committed lock predates a change, so their outs may differ); `differing` = outs of the other
    stages whose hash differs: same params + same inputs gave other bytes."""
    stale, differing = [], []
    for name, st in sorted(fresh.get("stages", {}).items()):
        old = committed.get("stages", {}).get(name)
        key = lambda s: (s.get("cmd"), [(d["path"], d.get("md5")) for d in s.get("deps", [])], s.get("params"))
        if old is None or key(old) != key(st):
            stale.append(name)
            continue
        was = {o["path"]: o.get("md5") for o in old.get("outs", [])}
        differing += [f"{name}: {o['path']}" for o in st.get("outs", []) if was.get(o["path"]) != o.get("md5")]
    return stale, differing


def test_lock_mismatches_tells_stale_from_differing():
    lock = {"stages": {"a": {"cmd": "x", "deps": [{"path": "p", "md5": "1"}], "outs": [{"path": "o", "md5": "9"}]},
                       "b": {"cmd": "y", "deps": [{"path": "o", "md5": "9"}], "outs": [{"path": "q", "md5": "8"}]}}}
    same = json.loads(json.dumps(lock))
    assert lock_mismatches(lock, same) == ([], [])
    same["stages"]["b"]["outs"][0]["md5"] = "7"
    assert lock_mismatches(lock, same) == ([], ["b: q"])
    same["stages"]["b"]["deps"][0]["md5"] = "6"
    assert lock_mismatches(lock, same) == (["b"], [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    """A real S3 API (moto) on 127.0.0.1, as dvc-s3's own tests use."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="pas-datasets")
    yield url, env
    server.stop()


@pytest.mark.slow
def test_full_pipeline_offline(tmp_path, s3_server):
    endpoint, aws_env = s3_server
    repo = make_repo(tmp_path / "repo")

    # 1. the whole DAG from a fresh clone
    t0 = time.time()
    out = run(["dvc", "repro"], repo)
    wall = time.time() - t0
    assert sorted(ran_stages(out.stdout)) == sorted(ALL)
    print(f"full dvc repro: {wall:.0f}s")
    # same params + same inputs -> the bytes of the committed dvc.lock, in any fresh clone: every stage
    # whose deps and params match the committed lock must have produced the same outs (in CI, where the
    # tree is a clean clone of main, that is every stage: a stale committed lock fails too)
    import yaml

    committed = yaml.safe_load((ROOT / "dvc.lock").read_text())
    stale, differing = lock_mismatches(committed, yaml.safe_load((repo / "dvc.lock").read_text()))
    assert not differing, f"outs differ from the committed dvc.lock with the same deps and params: {differing}"
    if os.environ.get("CI"):
        assert not stale, f"the committed dvc.lock is stale for {stale}: run `dvc repro` and commit dvc.lock"

    pool, concepts, dataset, ev, leak = (_metrics(repo, n) for n in ("pool", "concepts", "dataset", "eval",
                                                                     "leakage"))
    assert pool["n_indexed"] > 8000 and pool["skipped_too_large"] == 16
    assert concepts["B_after_validation"] > 0
    n = {stage: dataset[stage]["n"] for stage in ("retrieve", "generate", "dedup", "leakage", "ood", "prune")}
    assert 0 < n["prune"] <= n["ood"] == n["leakage"] <= n["dedup"] <= n["retrieve"] + n["generate"]
    assert dataset["generate"]["n"] == concepts["B_after_validation"] * 2 * 2  # n_cap × n_synth
    # the pool holds the eval test images: the ones retrieved come back and leakage drops them
    assert leak["n_in"] - leak["n_kept"] == sum(leak["dropped"].values()) >= 1
    assert ev["pretrain_images"] == n["prune"]
    for name, res in ev["sets"].items():
        for model in ("pretrained", "baseline"):
            for proto in ("knn_top1", "linear_top1"):
                assert 0.0 <= res[model][proto] <= 1.0, (name, model, proto)
    # the trained offline CLIP curates: retrieved real images are far more often food than chance
    prec = _metrics(repo, "precision")
    assert prec["retrieve"]["domain_precision"] > 3 * prec["pool"]["domain_precision"], prec
    assert prec["final"]["n_real"] == dataset["final"]["real"]
    summary = _metrics(repo, "summary")
    assert summary["funnel"] == n and summary["size"]["total"] == n["prune"]
    assert summary["top1"].keys() == ev["sets"].keys()
    page = (repo / "data/report/index.html").read_text()      # the run report, every section filled
    assert "Not available" not in page and (repo / "data/report/funnel.png").is_file()

    # 2. nothing changed: clean status, a second repro runs nothing
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout
    assert ran_stages(run(["dvc", "repro"], repo).stdout) == []
    # the plots of dvc.yaml render
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    assert (tmp_path / "plots" / "index.html").exists()

    # 3. publish: commit the run, push everything to S3
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "smoke run"], repo)
    # every dep has one name in the workspace and in the commit (an absolute pool path would not:
    # DVC names it `../../x` in one and `x` in the other, and `dvc exp show` would show both as changed)
    rows = json.loads(run(["dvc", "exp", "show", "--json", "-n", "1"], repo).stdout)
    deps = [set((r.get("data") or {}).get("deps") or {}) for r in rows[:2]]
    assert deps[0] and deps[0] == deps[1], deps[0] ^ deps[1]
    run(["dvc", "remote", "modify", "--local", "s3", "endpointurl", endpoint], repo)
    run(["dvc", "push", "-r", "s3"], repo, env=aws_env)

    # 4. a user: fresh git clone, pull just the final dataset
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "remote", "modify", "--local", "s3", "endpointurl", endpoint], clone)
    no_creds = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    wrong = run(["dvc", "pull", "-r", "s3", "data/dataset"], clone, check=False, env=no_creds)
    assert wrong.returncode != 0 and "credentials" in (wrong.stdout + wrong.stderr).lower()
    run(["dvc", "pull", "-r", "s3", "data/dataset"], clone, env=aws_env)
    assert file_digests(clone / "data/dataset") == file_digests(repo / "data/dataset")
    assert not (clone / "data/pool").exists()
    # an interrupted pull resumes: with part of the objects already local, only the rest is fetched
    objs = sorted(f for f in (clone / ".dvc/cache").rglob("*") if f.is_file() and not f.name.endswith(".dir"))
    for f in objs[::2]:
        f.unlink()
    import shutil
    shutil.rmtree(clone / "data/dataset")
    again = run(["dvc", "pull", "-r", "s3", "data/dataset"], clone, env=aws_env)
    assert f"{len(objs[::2])} file" in again.stdout or "fetched" in again.stdout.lower(), again.stdout
    assert file_digests(clone / "data/dataset") == file_digests(repo / "data/dataset")
    st = run(["dvc", "status", "-c", "-r", "s3", "data/dataset"], clone, env=aws_env)
    assert "in sync" in st.stdout, st.stdout
    # `dvc get` / `dvc import` of a published version from the git repo, data from its S3 remote (the
    # default remote is a folder relative to the repo, which DVC's temporary clone does not have)
    remote = ["--remote", "s3", "--remote-config", f"endpointurl={endpoint}"]
    run(["dvc", "get", str(repo), "data/dataset", "--rev", "HEAD", "-o", str(tmp_path / "got"), *remote],
        tmp_path, env=aws_env)
    assert file_digests(tmp_path / "got") == file_digests(repo / "data/dataset")
    user = tmp_path / "user"
    user.mkdir()
    run(["git", "init", "-q"], user)
    run(["dvc", "init", "-q"], user)
    run(["dvc", "import", str(repo), "data/dataset", "--rev", "HEAD", "-o", "food", *remote], user, env=aws_env)
    assert file_digests(user / "food") == file_digests(repo / "data/dataset")
    assert "repo:" in (user / "food.dvc").read_text()
    # then everything, and a repro that reruns nothing
    run(["dvc", "pull", "-r", "s3"], clone, env=aws_env)
    assert ran_stages(run(["dvc", "repro"], clone).stdout) == []

    # 5. an ablation reruns dedup and everything after it, nothing before (0.995: a threshold that
    # means something for the tiny random SSCD, see params.yaml; it merges a few more images)
    exp = run(["dvc", "exp", "run", "-S", "lambda_dup=0.995"], repo)
    assert sorted(ran_stages(exp.stdout)) == sorted(AFTER_DEDUP)
    show = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "lambda_dup" in show and "0.995" in show
    bad = run(["dvc", "exp", "run", "-S", "lamda_dup=0.5"], repo, check=False)
    assert bad.returncode != 0 and "lamda_dup" in bad.stdout + bad.stderr
    bad = run(["dvc", "exp", "run", "-S", "+lamda_dup=0.5"], repo, check=False)   # DVC lets `+` add a key
    assert bad.returncode != 0 and ran_stages(bad.stdout) == ["params"], bad.stdout + bad.stderr

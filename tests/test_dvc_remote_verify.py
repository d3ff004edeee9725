"""A remote object corrupted in place (same size) is refused on pull, naming the file: the committed
remotes have `verify = true`, so DVC re-hashes what it downloads (without it the bad bytes are checked
out silently; tried against the same moto server)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.test_e2e import s3_server  # noqa: F401 - the moto S3 server fixture

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, check=True):
    p = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    if check and p.returncode:
        raise AssertionError(f"{cmd} failed:\n{p.stdout}\n{p.stderr}")
    return p


def test_committed_remotes_verify_downloads():
    for remote in ("local", "s3"):
        p = _run(["dvc", "config", "--project", f"remote.{remote}.verify"], ROOT, {})
        assert p.stdout.strip() == "true", remote


def test_a_corrupted_remote_object_is_refused_on_pull(tmp_path, s3_server):  # noqa: F811
    import boto3

    endpoint, env = s3_server
    env = {**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")       # the project's remotes
    _run(["dvc", "remote", "modify", "--local", "s3", "endpointurl", endpoint], repo, env)
    (repo / "data" / "a.txt").write_text("the final dataset\n" * 20)
    _run(["dvc", "add", "data/a.txt"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "data"], repo, env)
    _run(["dvc", "push", "-r", "s3"], repo, env)

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    (obj,) = [o["Key"] for o in s3.list_objects_v2(Bucket="pas-datasets")["Contents"]]
    body = s3.get_object(Bucket="pas-datasets", Key=obj)["Body"].read()
    s3.put_object(Bucket="pas-datasets", Key=obj, Body=bytes([body[0] ^ 1]) + body[1:])   # same size

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    shutil.copy(repo / ".dvc" / "config.local", clone / ".dvc" / "config.local")
    p = _run(["dvc", "pull", "-r", "s3"], clone, env, check=False)
    assert p.returncode != 0
    assert "data/a.txt" in p.stdout + p.stderr
    assert not (clone / "data" / "a.txt").exists()

"""`dvc repro` of the set-up stages (models, pool) in a temp copy of the repo."""

import json

import pytest

from tests.dvc_helpers import make_repo, ran_stages, run


@pytest.mark.slow
def test_dvc_repro_models_and_pool(tmp_path, clipart_food):
    src = tmp_path / "imgs" / "food"
    src.mkdir(parents=True)
    for f in clipart_food[:12]:
        (src / f.name).write_bytes(f.read_bytes())
    repo = make_repo(tmp_path / "repo", {"pool": {"source": str(tmp_path / "imgs")}})
    out = run(["dvc", "repro", "pool_models@clip", "pool"], repo)
    assert ran_stages(out.stdout) == ["params", "pool_models@clip", "pool"]
    m = json.loads((repo / "metrics/pool.json").read_text())
    assert m["n_indexed"] == 12 and m["n_skipped"] == 0
    assert (repo / "data/pool/faiss.index").exists()
    # nothing changed: status clean, second repro runs nothing
    st = run(["dvc", "status", "pool_models@clip", "pool"], repo)
    assert "up to date" in st.stdout
    again = run(["dvc", "repro", "pool_models@clip", "pool"], repo)
    assert ran_stages(again.stdout) == []
    # a pool param change reruns pool (after the params check), and the offline CLIP, which is trained
    # on the pool's images as the pool stage decodes them
    exp = run(["dvc", "exp", "run", "-S", "pool.max_side=64", "pool_models@clip", "pool"], repo)
    assert ran_stages(exp.stdout) == ["params", "pool_models@clip", "pool"]
    # push / pull round trip through the default local remote
    run(["dvc", "push", "pool_models@clip", "pool"], repo)

"""pretrain: a killed run resumes to the same bytes; stale checkpoints are ignored; the stage's outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from pas.params import ParamsError, build
from pas.train.pretrain import CKPT_NAME, PretrainParams, lr_factor, pretrain
from tests.helpers import read_run
from tests.stage_helpers import load_stage
from tests.train_helpers import TINY_PRETRAIN, TINY_VIT, synthetic_shards, tiny_backbone_init, write_params

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw) -> PretrainParams:
    return build(PretrainParams, {"seed": 0, "pretrain": {**TINY_PRETRAIN, **kw}}, "pretrain")


def _outputs(d: Path) -> dict[str, bytes]:
    files = [d / "out" / "model.safetensors", d / "out" / "config.json", d / "out" / "pretrain.json"]
    files += sorted((d / "live" / "plots").rglob("*.tsv"))
    files.append(d / "live" / "metrics.json")   # tracked: a resumed run must not differ from a full one
    return {str(f.relative_to(d)): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return synthetic_shards(root / "ds", 24, maxcount=10), tiny_backbone_init(root / "init")


def _run(d: Path, data, cfg, **kw):
    shards, init = data
    return pretrain(cfg, shards, init, d / "out", d / "ckpt", live_dir=d / "live", progress=False, **kw)


@pytest.mark.parametrize("method,micro", [("mocov3", None), ("nnclr", None), ("nnclr", 4)])
def test_resume_after_a_stop_is_byte_identical(tmp_path, data, method, micro):
    # micro 4: batch 8 as 2 accumulated micro-batches (GradCache), streams of shards [10, 10, 4] dealt in two
    cfg = _cfg(method=method, epochs=3, memory_bank_size=16, micro_batch_size=micro)
    full = _run(tmp_path / "full", data, cfg)
    assert full["resumed_from_epoch"] is None and full["accumulate"] == (2 if micro else 1)
    assert full["steps"] == 3 * (3 if micro is None else 1)   # the 4-image shard alone feeds one stream once
    stopped = _run(tmp_path / "cut", data, cfg, stop_after_epoch=1)
    assert stopped == {"stopped_after_epoch": 1}
    assert not (tmp_path / "cut" / "out" / "model.safetensors").exists()
    ck = torch.load(tmp_path / "cut" / "ckpt" / CKPT_NAME, weights_only=False)
    assert ck["epoch"] == 1 and {"model", "optimizer", "scheduler", "rng", "extra", "history"} <= set(ck)
    assert any(k.startswith("backbone_momentum.") for k in ck["model"]) == (method == "mocov3")
    assert ("bank" in ck["extra"]) == (method == "nnclr")
    resumed = _run(tmp_path / "cut", data, cfg)
    assert resumed["resumed_from_epoch"] == 1
    a, b = _outputs(tmp_path / "full"), _outputs(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) >= 6
    for name in a:   # weights, config, summary, the dvclive curves (replayed history) and metrics
        assert a[name] == b[name], name
    # rerunning a finished run (same fingerprint) trains nothing and rewrites the same weights
    again = _run(tmp_path / "cut", data, cfg)
    assert again["resumed_from_epoch"] == 3
    assert _outputs(tmp_path / "cut")["out/model.safetensors"] == a["out/model.safetensors"]


@pytest.mark.parametrize("torn", [b"", 0.5])
def test_torn_checkpoint_trains_from_scratch(tmp_path, data, caplog, torn):
    """A last.pt cut short (empty, or half a zip) is ignored with a warning naming it; the rerun
    trains from epoch 0 and ends with the bytes of an uninterrupted run."""
    cfg = _cfg(epochs=2)
    _run(tmp_path, data, cfg, stop_after_epoch=1)
    ckpt = tmp_path / "ckpt" / CKPT_NAME
    ckpt.write_bytes(torn if isinstance(torn, bytes) else ckpt.read_bytes()[:int(ckpt.stat().st_size * torn)])
    with caplog.at_level(logging.WARNING):
        res = _run(tmp_path, data, cfg)
    assert res["resumed_from_epoch"] is None and str(ckpt) in caplog.text
    ref = _run(tmp_path / "ref", data, cfg)
    assert _outputs(tmp_path)["out/model.safetensors"] == _outputs(tmp_path / "ref")["out/model.safetensors"]
    assert ref["loss_last_epoch"] == res["loss_last_epoch"]


def test_fingerprint_is_the_content_of_the_shards_not_their_names_and_sizes(tmp_path, data):
    """The one input-identity rule of resumable work: other bytes of the same size are another input,
    the same bytes rewritten (a `dvc checkout`, a new mtime) the same one."""
    import os
    import shutil

    from pas.train.pretrain import _fingerprint

    shards, init = data
    copy = tmp_path / "ds"
    shutil.copytree(shards, copy)
    layout = {"world": 1}
    fp = _fingerprint(_cfg(), copy, init, layout)
    assert _fingerprint(_cfg(), shards, init, layout) == fp
    tar = sorted(copy.glob("*.tar"))[0]
    data_ = bytearray(tar.read_bytes())
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert _fingerprint(_cfg(), copy, init, layout) == fp
    data_[600] ^= 0xFF                                  # one byte of a member: same name, same size
    tar.unlink()
    tar.write_bytes(bytes(data_))
    assert _fingerprint(_cfg(), copy, init, layout) != fp


def test_checkpoint_of_other_params_is_ignored(tmp_path, data):
    _run(tmp_path, data, _cfg(epochs=2), stop_after_epoch=1)
    res = _run(tmp_path, data, _cfg(epochs=2, lr=5e-4))
    assert res["resumed_from_epoch"] is None
    ref = _run(tmp_path / "ref", data, _cfg(epochs=2, lr=5e-4))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "ref" / "out" / "model.safetensors").read_bytes()
    assert ref["loss_last_epoch"] == res["loss_last_epoch"]


def test_curves_and_summary(tmp_path, data):
    res = _run(tmp_path, data, _cfg(epochs=2))
    live = tmp_path / "live" / "plots" / "metrics"
    loss = (live / "train" / "loss.tsv").read_text().splitlines()
    lr = (live / "train" / "lr.tsv").read_text().splitlines()
    epoch = (live / "epoch" / "loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and len(loss) == 1 + res["steps"]
    assert len(lr) == 1 + res["steps"] and len(epoch) == 1 + 2
    lrs = [float(r.split("\t")[1]) for r in lr[1:]]
    assert lrs[0] < lrs[2] and lrs[-1] < lrs[2]      # warmup, then cosine decay
    assert res["n_images"] == 24 and res["samples_seen"] == 2 * 3 * 8 and res["forward_passes"] == 2 * 48
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["n_images"] == 24


def test_lr_factor_hand_values():
    # 2 warmup epochs of 2 steps (linear), then a half cosine over the remaining 4 steps
    assert [lr_factor(s, 2, 4, 2, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 2, 4, 2, "cosine") == 1.0
    assert lr_factor(5, 2, 4, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(6, 2, 4, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(0, 2, 4, 0, "cosine") == 1.0
    assert lr_factor(7, 2, 4, 2, "constant") == 1.0


def test_params_validation_names_the_key():
    with pytest.raises(ParamsError, match="pretrain.method"):
        build(PretrainParams, {"pretrain": {"method": "byol"}}, "pretrain")
    with pytest.raises(ParamsError, match="pretrain.batch_size"):
        build(PretrainParams, {"pretrain": {"batch_size": 1}}, "pretrain")
    with pytest.raises(ParamsError, match="pretrain.lr"):
        build(PretrainParams, {"pretrain": {"lr": "fast"}}, "pretrain")
    assert build(PretrainParams, {"seed": 7, "pretrain": {}}, "pretrain").seed == 7


def test_bad_inputs_fail_clearly(tmp_path, data):
    shards, init = data
    with pytest.raises(ParamsError, match="image_size=64.*img_size"):
        pretrain(_cfg(image_size=64), shards, init, tmp_path / "o", tmp_path / "c", progress=False)
    with pytest.raises(ParamsError, match="batch_size=64"):
        pretrain(_cfg(batch_size=64), shards, init, tmp_path / "o", tmp_path / "c", progress=False)


def test_stage_main(tmp_path, data):
    shards, init = data
    params = write_params(tmp_path / "params.yaml", pretrain={**TINY_PRETRAIN, "epochs": 1, "warmup_epochs": 0},
                          models={"backbone_init": TINY_VIT})
    out = tmp_path / "backbone"
    argv = ["--data", str(shards), "--init", str(init), "--out", str(out), "--ckpt", str(tmp_path / "ck"),
            "--live", str(tmp_path / "live"), "--params", str(params), "--metrics", str(tmp_path / "m.json")]
    assert load_stage("pretrain").main(argv) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"method", "backbone", "n_images", "epochs", "forward_passes", "loss_last_epoch"} <= set(m)
    # wall time, resume point and process layout go to the untracked run log beside the metrics
    assert "seconds" not in m and "resumed_from_epoch" not in m and "processes" not in m
    run = read_run(tmp_path / "m.json")
    assert set(run) == {"seconds", "resumed_from_epoch", "processes", "accumulate", "micro_batch"}
    assert (run["processes"], run["accumulate"], run["micro_batch"]) == (1, 1, 8)
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 192)


_CHILD = """
import sys, time
sys.path[:0] = [{src!r}, {root!r}]
import tests.train_helpers
from pas.train.pretrain import pretrain, PretrainParams
from pas.params import build
cfg = build(PretrainParams, {{"seed": 0, "pretrain": {cfg!r}}}, "pretrain")
pretrain(cfg, {shards!r}, {init!r}, {out!r}, {ckpt!r}, progress=False,
         on_epoch_end=lambda e: (print("EPOCH", e, flush=True), time.sleep(30 if {slow!r} else 0)))
"""


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, data):
    """A real SIGKILL of the training process after its first checkpoint, then a rerun."""
    shards, init = data
    cfg = {**TINY_PRETRAIN, "epochs": 3}

    def child(d: Path, slow: bool):
        code = _CHILD.format(src=str(ROOT / "src"), root=str(ROOT), cfg=cfg, shards=str(shards), init=str(init),
                             out=str(d / "out"), ckpt=str(d / "ckpt"), slow=slow)
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)

    ref = child(tmp_path / "ref", False)
    assert ref.wait(timeout=300) == 0
    victim = child(tmp_path / "run", True)
    assert victim.stdout.readline().split() == ["EPOCH", "1"]   # first checkpoint written
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "out").exists()
    again = child(tmp_path / "run", False)
    lines = again.communicate(timeout=300)[0].split("\n")
    assert again.returncode == 0 and lines[0] == "EPOCH 2"       # resumed after epoch 1
    assert (tmp_path / "run" / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "ref" / "out" / "model.safetensors").read_bytes()


def test_dvc_pretrain_declares_no_eval_params():
    """Changing an eval.* param must not rerun pretrain (checked once the lead wires dvc.yaml)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text()).get("stages", {})
    if "pretrain" not in stages:
        pytest.skip("dvc.yaml has no pretrain stage yet")
    declared = [p if isinstance(p, str) else next(iter(p)) for p in stages["pretrain"].get("params", [])]
    assert all(p == "seed" or p == "pretrain" or p.startswith("pretrain.") for p in declared), declared
    fields = {f.name for f in dataclasses.fields(PretrainParams)}
    assert "pretrain" in declared or fields - {"seed"} <= {p.split(".", 1)[1] for p in declared if "." in p}


def test_a_failing_run_leaves_the_previous_dvclive_curves_untouched(tmp_path, data):
    # dvclive/pretrain is a git-tracked persist out: only a finished run may replace it, and whole
    cfg = _cfg(epochs=2)
    _run(tmp_path, data, cfg)
    live = tmp_path / "live"
    (live / "stale.tsv").write_text("from an older run\n")
    before = {str(p.relative_to(live)): p.read_bytes() for p in sorted(live.rglob("*")) if p.is_file()}
    assert "plots/metrics/train/loss.tsv" in before

    def boom(epoch):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        pretrain(_cfg(epochs=2, lr=2e-3), *data, tmp_path / "out2", tmp_path / "ckpt2", live_dir=live,
                 progress=False, on_epoch_end=boom)
    after = {str(p.relative_to(live)): p.read_bytes() for p in sorted(live.rglob("*")) if p.is_file()}
    assert after == before
    # a finished run replaces the folder whole: the stale file of the older run is gone
    pretrain(_cfg(epochs=2, lr=2e-3), *data, tmp_path / "out2", tmp_path / "ckpt2", live_dir=live, progress=False)
    files = {str(p.relative_to(live)) for p in live.rglob("*") if p.is_file()}
    assert "stale.tsv" not in files and "plots/metrics/train/loss.tsv" in files
    assert not list((tmp_path / "ckpt2").glob(".*live-tmp"))

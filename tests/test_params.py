import dataclasses

import pytest
import yaml

from pas.params import PaperParams, ParamsError, build, check_range, load, validate
from tests.conftest import REPO


def test_repo_params_yaml_is_valid():
    p = load(REPO / "params.yaml")
    paper = build(PaperParams, p)
    for key in ("lambda_1", "lambda_2", "lambda_dup", "lambda_leak", "k_dup", "k_leak",
                "k_retrieve", "n_cap", "n_synth", "seed"):
        assert key in p, f"paper key {key} must be top-level"
        assert getattr(paper, key) == p[key]


@pytest.mark.parametrize("key,value,msg", [
    ("lambda_dup", 1.0, "lambda_dup=1.0 must be < 1.0"),
    ("lambda_dup", 0, "lambda_dup=0.0 must be > 0.0"),
    ("lambda_1", -0.1, "lambda_1=-0.1 must be > 0.0"),
    ("k_dup", 0, "k_dup=0 must be >= 1"),
    ("k_leak", 2.5, "k_leak=2.5: expected int"),
    ("lambda_leak", "high", "lambda_leak='high': expected float"),
    ("seed", True, "seed=True: expected int"),
])
def test_paper_key_errors_name_the_key(key, value, msg):
    base = load(REPO / "params.yaml")
    with pytest.raises(ParamsError, match=msg.replace("(", r"\(").replace("+", r"\+")):
        validate({**base, key: value})


def test_unknown_keys_fail_clearly():
    base = load(REPO / "params.yaml")
    with pytest.raises(ParamsError, match="lamda_dup: unknown top-level key"):
        validate({**base, "lamda_dup": 0.5})
    with pytest.raises(ParamsError, match=r"pool.max_pixel: unknown key"):
        validate({**base, "pool": {**base["pool"], "max_pixel": 5}})
    with pytest.raises(ParamsError, match=r"pool.index='annoy' must be one of"):
        validate({**base, "pool": {**base["pool"], "index": "annoy"}})


def test_models_spec_validation():
    base = load(REPO / "params.yaml")
    bad = {**base, "models": {**base["models"], "clip": {"kind": "open_clip", "name": "ViT-L-14"}}}
    with pytest.raises(ParamsError, match=r"clip.pretrained: missing for kind 'open_clip'"):
        validate(bad)
    bad = {**base, "models": {**base["models"], "sscd": {"kind": "magic"}}}
    with pytest.raises(ParamsError, match=r"sscd.kind='magic' must be one of"):
        validate(bad)


def test_int_accepted_for_float_and_coerced():
    @dataclasses.dataclass(frozen=True)
    class P:
        lambda_dup: float = 0.6
        names: tuple[str, ...] = ()

    p = build(P, {"lambda_dup": 1, "sec": {"names": ["a", "b"]}}, "sec")
    assert p.lambda_dup == 1.0 and isinstance(p.lambda_dup, float) and p.names == ("a", "b")
    with pytest.raises(ParamsError, match=r"sec.names=\['a', 3\]: expected"):
        build(P, {"sec": {"names": ["a", 3]}}, "sec")


def test_check_range_boundaries():
    check_range("x", 0.5, 0, 1)
    check_range("x", 0, 0, 1, lo_open=False)
    with pytest.raises(ParamsError):
        check_range("x", 1, 0, 1)


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("lambda_dup: [0.6\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load(f)
    f.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load(f)


def test_paper_keys_only_at_top_level():
    base = load(REPO / "params.yaml")
    with pytest.raises(ParamsError, match="prune.seed: paper hyperparameters are top-level keys"):
        validate({**base, "prune": {**base["prune"], "seed": 3}})


@pytest.mark.parametrize("preset", ["paper-food", "paper-birds", "paper-food-resnet18", "paper-food-resnet50"])
def test_paper_presets_are_valid_and_carry_the_paper_values(preset):
    p = load(REPO / "configs" / f"{preset}.yaml")
    base = load(REPO / "params.yaml")
    assert set(p) == set(base)  # a preset replaces params.yaml whole: same keys, so DVC finds every param
    assert (p["lambda_1"], p["lambda_2"], p["lambda_dup"], p["lambda_leak"]) == (0.01, 0.01, 0.6, 0.45)
    assert (p["k_dup"], p["k_leak"], p["k_retrieve"], p["n_cap"], p["n_synth"]) == (64, 32, 500, 5, 35)
    assert p["models"]["clip"] == {"kind": "open_clip", "name": "ViT-L-14", "pretrained": "openai"}
    assert p["concepts"]["validator"] == "llm" and p["llm"]["l3"]["model"] != p["llm"]["l1"]["model"]
    pt = p["pretrain"]
    assert (pt["batch_size"], pt["devices"], pt["autocast"], pt["sync_bn"]) == (4096, "auto", "bfloat16", True)
    backbone = p["models"]["backbone_init"]["name"]
    if "resnet" in preset:   # NNCLR, "default parameters adapted to 500 epochs" (paper §4.1)
        assert backbone == preset.rsplit("-", 1)[1]
        assert (pt["method"], pt["epochs"], pt["optimizer"], pt["temperature"]) == ("nnclr", 500, "lars", 0.1)
        assert (pt["memory_bank_size"], pt["hidden_dim"], pt["pred_hidden_dim"]) == (98304, 2048, 4096)
    else:                    # MoCo v3 ViT-B/16, its 300-epoch defaults
        assert backbone == "vit_base_patch16_224" and p["models"]["backbone_init"]["kwargs"]["img_size"] == 224
        assert (pt["method"], pt["epochs"], pt["lr"], pt["warmup_epochs"]) == ("mocov3", 300, 1.5e-4, 40)
        assert pt["freeze_patch_embed"] and pt["optimizer"] == "adamw" and pt["weight_decay"] == 0.1


def _with(base: dict, path: str, value) -> dict:
    """A deep copy of `base` with the dotted `path` (list items as [i]) set to `value`."""
    import copy
    import re

    out = copy.deepcopy(base)
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node = out
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return out


@pytest.mark.parametrize("path,msg", [
    ("lamda_dup", "lamda_dup: unknown top-level key; did you mean `lambda_dup`?"),
    ("pool.max_pixel", "pool.max_pixel: unknown key; did you mean `pool.max_pixels`?"),
    ("pretrain.lrr", "pretrain.lrr: unknown key; did you mean `pretrain.lr`?"),
    ("models.clip.sed", "models.clip.sed: unknown key for kind 'trained'; did you mean `models.clip.seed`?"),
    ("models.clipp", "models.clipp: unknown key; did you mean `models.clip`?"),
    ("llm.l1.temprature", "llm.l1.temprature: unknown key; did you mean `llm.l1.temperature`?"),
    ("eval.sets[0].test_fracton",
     "eval.sets[clipart_food].test_fracton: unknown key; did you mean `eval.sets[clipart_food].test_fraction`?"),
    ("retrieve.service.urll", "retrieve.service.urll: unknown key; did you mean `retrieve.service.url`?"),
])
def test_unknown_keys_name_the_nearest_valid_key(path, msg):
    base = load(REPO / "params.yaml")
    with pytest.raises(ParamsError) as e:
        validate(_with(base, path, {"kind": "tiny"} if path == "models.clipp" else 1))
    assert str(e.value) == msg


def test_unknown_key_without_a_near_one_lists_the_known_keys():
    base = load(REPO / "params.yaml")
    with pytest.raises(ParamsError, match=r"^zzz: unknown top-level key; known: captions, concepts, dedup, "):
        validate({**base, "zzz": 1})


@pytest.mark.parametrize("path,value,msg", [
    ("lambda_dup", float("nan"), "lambda_dup=nan must be a finite number"),
    ("pretrain.lr", float("nan"), "pretrain.lr=nan must be a finite number"),
    ("pretrain.weight_decay", float("inf"), "pretrain.weight_decay=inf must be a finite number"),
    ("eval.knn_temperature", float("-inf"), "eval.knn_temperature=-inf must be a finite number"),
    ("llm.l1.temperature", float("nan"), "llm.l1.temperature=nan must be a finite number"),
    ("models.backbone_init.kwargs.drop_rate", float("nan"),
     "models.backbone_init.kwargs.drop_rate=nan must be a finite number"),
    ("eval.sets[0].test_fraction", float("nan"), "eval.sets[0].test_fraction=nan must be a finite number"),
    ("seed", 2**70, "seed=1180591620717411303424 is out of range (an int param must fit in 64 bits)"),
    ("seed", 2**32, "seed=4294967296 must be < 4294967296"),
    ("seed", -1, "seed=-1 must be >= 0"),
    ("eval.split_seed", 2**32, "eval.split_seed=4294967296 must be < 4294967296"),
    ("models.clip.seed", 2**40, "models.clip.seed=1099511627776 must be < 4294967296"),
    ("pretrain.epochs", 2**64, "pretrain.epochs=18446744073709551616 is out of range"),
    ("pool.nlist", 0, "pool.nlist=0 must be >= 1"),
    ("pool.min_side", 0, "pool.min_side=0 must be >= 1"),
    ("pool.workers", 2, "pool.workers: removed; decode processes are a machine setting: set PAS_POOL_WORKERS"),
])
def test_numbers_are_finite_and_bounded(path, value, msg):
    base = load(REPO / "params.yaml")
    with pytest.raises(ParamsError) as e:
        validate(_with(base, path, value))
    assert str(e.value).startswith(msg)


# one name per idea: images per output shard is `shard_size`, CPU threads `threads`, in every section
@pytest.mark.parametrize("old,new,value", [
    ("retrieve.maxcount", "retrieve.shard_size", 10_000),
    ("pool.shard_maxcount", "pool.shard_size", 10_000),
    ("prune.shard_maxcount", "prune.shard_size", 10_000),
])
def test_old_shard_size_keys_name_the_new_key(old, new, value):
    base = load(REPO / "params.yaml")
    with pytest.raises(ParamsError) as e:
        validate(_with(base, old, value))
    assert str(e.value) == f"{old}: removed; now named `{new}`; rename the key"


@pytest.mark.parametrize("old,msg", [
    ("llm.l1.cpu_threads", "llm.l1.cpu_threads: removed; now named `threads` (0 = torch default, was null)"),
    ("llm.l4.cpu_threads", "llm.l4.cpu_threads: removed; now named `threads` (0 = torch default, was null)"),
    ("diffusion.cpu_threads", "diffusion.cpu_threads: removed; now named `threads` (0 = torch default, was null)"),
    ("ood.det_threads", "ood.det_threads: removed; now named `ood.threads`"),
])
def test_old_thread_keys_name_the_new_key(old, msg):
    base = load(REPO / "params.yaml")
    with pytest.raises(ParamsError) as e:
        validate(_with(base, old, 1))
    assert str(e.value) == f"{msg}; rename the key"


def test_largest_seed_is_accepted_and_yaml_nan_is_refused(tmp_path):
    base = load(REPO / "params.yaml")
    validate({**base, "seed": 2**32 - 1})
    f = tmp_path / "params.yaml"
    f.write_text((REPO / "params.yaml").read_text().replace("lambda_dup: 0.9995", "lambda_dup: .nan"))
    with pytest.raises(ParamsError, match=r"^lambda_dup=nan must be a finite number$"):
        load(f)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_range_refuses_non_finite(value):
    # every section's own checks go through check_range; a NaN compares False with every bound
    with pytest.raises(ParamsError, match="must be a finite number"):
        check_range("x", value, 0.0, 1.0)
    with pytest.raises(ParamsError, match="must be a finite number"):
        check_range("x", value)


STAGE_SCRIPTS = sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "concepts")


@pytest.mark.parametrize("stage", STAGE_SCRIPTS)
def test_stage_scripts_end_with_run_stage(stage):
    # the one shared path for config errors (concepts.py is wt-llm's and still raises)
    assert "sys.exit(run_stage(main))" in (REPO / "stages" / f"{stage}.py").read_text()


def test_a_config_error_is_one_line_and_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("lambda_dup:", "lamda_dup:"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run([sys.executable, str(REPO / "stages" / "pool.py"), "--params", str(bad),
                        "--out", str(tmp_path / "pool"), "--metrics", str(tmp_path / "m.json")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "params error: lamda_dup: unknown top-level key; did you mean `lambda_dup`?"]
    assert not (tmp_path / "pool").exists() and not (tmp_path / "m.json").exists()

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


@pytest.mark.parametrize("preset", ["paper-food", "paper-birds"])
def test_paper_presets_are_valid_and_carry_the_paper_values(preset):
    p = load(REPO / "configs" / f"{preset}.yaml")
    base = load(REPO / "params.yaml")
    assert set(p) == set(base)  # a preset replaces params.yaml whole: same keys, so DVC finds every param
    assert (p["lambda_1"], p["lambda_2"], p["lambda_dup"], p["lambda_leak"]) == (0.01, 0.01, 0.6, 0.45)
    assert (p["k_dup"], p["k_leak"], p["k_retrieve"], p["n_cap"], p["n_synth"]) == (64, 32, 500, 5, 35)
    assert p["models"]["clip"] == {"kind": "open_clip", "name": "ViT-L-14", "pretrained": "openai"}
    assert p["concepts"]["validator"] == "llm" and p["llm"]["l3"]["model"] != p["llm"]["l1"]["model"]
    assert p["pretrain"]["method"] == "mocov3" and p["pretrain"]["epochs"] == 300

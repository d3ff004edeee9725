"""pas.models.clipn: CLIPN's no-tower built from a (tiny, constructed) CLIPN state dict, and the
`models.clipn` family (spec validation, the models stage from a path and from a URL, sha256)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from pas.models.clipn import (base_matches, build_no_tower, has_no_tower,  # noqa: E402
                              load_clipn_no_encoder, read_state_dict)
from tests.standins.fixtures import file_server  # noqa: E402,F401  (fixture)

TEXT_PARTS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
TEXTS = ["a photo of a pizza.", "a photo of a sushi.", "a photo of a car."]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from pas.models.clip import build_tiny_clip, load_clip

    return load_clip(build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0))


def _clipn_state_dict(model, seed=1, prompt_scale=0.05):
    """What a CLIPN checkpoint holds: the CLIP weights (frozen yes-tower + image tower) plus a trained
    copy of the text tower under *_no names and 16 learned no-prompts."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in model.state_dict().items():
        if k.startswith(TEXT_PARTS):
            head, dot, rest = k.partition(".")
            sd[f"{head}_no{dot}{rest}"] = v + 0.02 * torch.randn(v.shape, generator=g)
    L, W = model.positional_embedding.shape
    sd["prompt_no"] = prompt_scale * torch.randn(16, L, W, generator=g)
    return sd


def _reference_no_embeddings(clip, sd):
    """Independent path: open_clip's own encode_text on a model copy whose yes-weights are replaced by
    the no-weights, with mean(prompt_no) folded into the positional embedding (same sum)."""
    ref = copy.deepcopy(clip.model)
    state = ref.state_dict()
    for k in list(state):
        if k.startswith(TEXT_PARTS):
            head, dot, rest = k.partition(".")
            state[k] = sd[f"{head}_no{dot}{rest}"]
    state["positional_embedding"] = sd["positional_embedding_no"] + sd["prompt_no"].mean(0)
    ref.load_state_dict(state)
    with torch.inference_mode():
        return ref.encode_text(clip.tokenizer(TEXTS), normalize=True).numpy()


def test_no_tower_matches_reference(clip, tmp_path):
    sd = _clipn_state_dict(clip.model)
    # saved as CLIPN's training saves it: {"epoch", "state_dict"} with DataParallel's "module." prefix
    path = tmp_path / "epoch_10.pt"
    torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    enc = load_clipn_no_encoder(path, clip)
    got = enc.encode_texts(TEXTS)
    assert got.shape == (3, clip.model.text_projection.shape[1]) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, _reference_no_embeddings(clip, sd), atol=1e-5)
    # and it is a different tower: the no-embeddings differ from the yes-embeddings
    assert np.abs(got - clip.encode_texts(TEXTS)).max() > 1e-3


def test_untrained_copy_equals_yes_tower(clip):
    # CLIPN initialises the no-tower as a copy of the yes-tower with zero prompts: same embeddings
    sd = {k: v.clone() for k, v in clip.model.state_dict().items()}
    for k, v in clip.model.state_dict().items():
        if k.startswith(TEXT_PARTS):
            head, dot, rest = k.partition(".")
            sd[f"{head}_no{dot}{rest}"] = v.clone()
    sd["prompt_no"] = torch.zeros(16, *clip.model.positional_embedding.shape)
    from pas.models.clipn import NoTextEncoder

    enc = NoTextEncoder(build_no_tower(clip.model, sd), clip.tokenizer)
    np.testing.assert_allclose(enc.encode_texts(TEXTS), clip.encode_texts(TEXTS), atol=1e-5)
    assert base_matches(clip.model, sd) is True


def test_bad_checkpoints_are_refused(clip, tmp_path):
    plain = dict(clip.model.state_dict())
    assert not has_no_tower(plain)
    with pytest.raises(ValueError, match="not a CLIPN checkpoint"):
        build_no_tower(clip.model, plain)
    sd = _clipn_state_dict(clip.model)
    missing = {k: v for k, v in sd.items() if k != "ln_final_no.weight"}
    with pytest.raises(ValueError, match="ln_final_no.weight"):
        build_no_tower(clip.model, missing)
    wrong = dict(sd, text_projection_no=torch.zeros(7, 7))
    with pytest.raises(ValueError, match="text_projection_no"):
        build_no_tower(clip.model, wrong)
    other = dict(sd, text_projection=sd["text_projection"] + 1)
    assert base_matches(clip.model, other) is False
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pt")


def test_safetensors_checkpoint(clip, tmp_path):
    from safetensors.torch import save_file

    sd = _clipn_state_dict(clip.model, seed=3)
    path = tmp_path / "clipn.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    got = load_clipn_no_encoder(path, clip).encode_texts(TEXTS[:2])
    np.testing.assert_allclose(got, _reference_no_embeddings(clip, sd)[:2], atol=1e-5)


# ------------------------------------------------------------------ the models.clipn model family

def _stage(tmp_path, spec, capsys=None):
    """`stages/models.py clipn <out>` on a params.yaml whose models.clipn is `spec`: (rc, out, stderr)."""
    import yaml

    from pas.params import run_stage
    from tests.stage_helpers import load_stage

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"models": {"clipn": spec}}))
    out = tmp_path / "models" / "clipn"
    rc = run_stage(lambda: load_stage("models").main(
        ["clipn", str(out), "--params", str(tmp_path / "params.yaml"), "--metrics", str(tmp_path / "m.json")]))
    return rc, out, capsys.readouterr().err if capsys else ""


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, clip):
    """A CLIPN checkpoint for the tiny CLIP of seed 0 (the `clip` fixture): (path, sha256)."""
    from pas.hashing import sha256_file
    from tests.standins.repos import write_clipn_checkpoint

    path = write_clipn_checkpoint(tmp_path_factory.mktemp("ckpt") / "epoch_10.pt", clip.model.state_dict(), seed=1)
    return path, sha256_file(path)


def test_spec_validation_is_one_line_naming_the_key():
    from pas.models.specs import ModelsParams
    from pas.params import ParamsError, build

    def err(spec) -> str:
        with pytest.raises(ParamsError) as e:
            build(ModelsParams, {"models": {"clipn": spec}}, "models")
        assert "\n" not in str(e.value)
        return str(e.value)

    base = {"kind": "open_clip", "name": "ViT-B-16", "pretrained": "openai"}
    assert err({"kind": "clipn", "base": base}) == "models.clipn.checkpoint: missing for kind 'clipn'"
    assert err({"kind": "clipn", "checkpoint": {"path": "x.pt"}}) == "models.clipn.base: missing for kind 'clipn'"
    assert "models.clipn.checkpoint.sha256: missing" in err({"kind": "clipn", "base": base,
                                                            "checkpoint": {"url": "http://h/x.pt"}})
    assert "models.clipn.checkpoint.sha256='abc'" in err({"kind": "clipn", "base": base,
                                                         "checkpoint": {"path": "x.pt", "sha256": "abc"}})
    assert "exactly one of `url` or `path`" in err({"kind": "clipn", "base": base, "checkpoint": {}})
    assert "models.clipn.base.kind='trained'" in err({"kind": "clipn", "base": {"kind": "trained"},
                                                      "checkpoint": {"path": "x.pt"}})
    # the default: no CLIPN; a path needs no sha256
    assert build(ModelsParams, {}, "models").clipn == {"kind": "none"}
    build(ModelsParams, {"models": {"clipn": {"kind": "clipn", "base": base, "checkpoint": {"path": "x.pt"}}}},
          "models")


def test_old_ood_clipn_checkpoint_names_the_new_key():
    from pas.curate.ood import OodParams
    from pas.params import ParamsError, build

    with pytest.raises(ParamsError, match=r"^ood.clipn_checkpoint: removed; .*`models.clipn`"):
        build(OodParams, {"ood": {"clipn_checkpoint": "/data/clipn.pt"}}, "ood")


def test_models_stage_not_configured_writes_only_the_marker(tmp_path):
    from pas.curate.ood import ood_models
    from pas.models.clipn import read_clipn_dir

    rc, out, _ = _stage(tmp_path, {"kind": "none"})
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["clipn.json"]
    assert read_clipn_dir(out) is None
    assert ood_models("models/clip", str(out)).clip_dir == "models/clip"
    assert ood_models("models/clip", str(out)).clipn_checkpoint is None


def test_models_stage_from_a_local_path(tmp_path, clip, tiny_ckpt):
    from pas.curate.ood import ood_models
    from pas.models.clip import load_clip
    from pas.models.clipn import read_clipn_dir

    path, sha = tiny_ckpt
    spec = {"kind": "clipn", "base": {"kind": "tiny", "seed": 0}, "checkpoint": {"path": str(path)}}
    rc, out, _ = _stage(tmp_path, spec)
    assert rc == 0
    base, ckpt = read_clipn_dir(out)
    assert ckpt.read_bytes() == path.read_bytes() and ckpt.name == "checkpoint.pt"
    m = ood_models("models/clip", str(out))
    assert (m.clip_dir, m.clipn_checkpoint, m.mode) == (str(base), str(ckpt), "clipn")
    import json

    manifest = json.loads((out / "clipn.json").read_text())
    assert manifest["sha256"] == sha and manifest["base_match"] is True and manifest["source"] == str(path)
    # the base is the CLIP of the spec, and the no-tower loads onto it
    got = load_clipn_no_encoder(ckpt, load_clip(base)).encode_texts(TEXTS)
    np.testing.assert_allclose(got, load_clipn_no_encoder(path, clip).encode_texts(TEXTS), atol=1e-6)


def test_models_stage_from_a_url_with_sha256(tmp_path, tiny_ckpt, file_server, capsys):
    import shutil

    path, sha = tiny_ckpt
    root, url = file_server
    shutil.copy2(path, root / "clipn-b16.pt")
    spec = {"kind": "clipn", "base": {"kind": "tiny", "seed": 0},
            "checkpoint": {"url": f"{url}/clipn-b16.pt", "sha256": sha.upper()}}
    rc, out, _ = _stage(tmp_path, spec, capsys)
    assert rc == 0 and (out / "checkpoint.pt").read_bytes() == path.read_bytes()
    # a wrong sha256: exit 2, one line naming the key, no checkpoint left behind
    spec["checkpoint"]["sha256"] = "0" * 64
    rc, out, err = _stage(tmp_path, spec, capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("params error: models.clipn.checkpoint.sha256: ") and sha in err
    assert not (out / "checkpoint.pt").exists() and not (out / "clipn.json").exists()


def test_models_stage_refuses_a_checkpoint_for_another_base(tmp_path, tiny_ckpt, capsys):
    # CLIPN's ViT-B/16 weights on a base of another width: one line, at the models stage (not in ood)
    path, _ = tiny_ckpt
    spec = {"kind": "clipn", "base": {"kind": "local", "path": str(tmp_path / "wide")},
            "checkpoint": {"path": str(path)}}
    from pas.models.clip import TINY_MODEL_CFG, build_tiny_clip

    wide = {**TINY_MODEL_CFG, "text_cfg": {**TINY_MODEL_CFG["text_cfg"], "width": 64}}
    build_tiny_clip(tmp_path / "wide", seed=0, model_cfg=wide)
    rc, _, err = _stage(tmp_path, spec, capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("params error: models.clipn.checkpoint: ")
    assert "shapes differ" in err

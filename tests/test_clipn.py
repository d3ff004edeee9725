"""pas.models.clipn: CLIPN's no-tower built from a (tiny, constructed) CLIPN state dict."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from pas.models.clipn import (base_matches, build_no_tower, has_no_tower,  # noqa: E402
                              load_clipn_no_encoder, read_state_dict)

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

"""pas.curate.ood: the CLIPN OOD formula by hand, chunked == dense, the three metrics, the stage."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFont

from pas.curate.ood import (OodParams, Timings, TextSets, derive_generalized_concepts, ensemble, ood_scores,
                            score_images, three_scores)
from pas.params import ParamsError, build
from tests.helpers import ood_scores_dense, read_run
from tests.stage_helpers import load_stage

S = 100.0  # CLIP logit scale


def _unit_rows(cos: np.ndarray, dim: int, offset: int) -> np.ndarray:
    """Rows g_c with g_c·e_i = cos[i, c] for image basis vectors e_0, e_1, made unit length with a
    private extra axis per row (offset + c), so every cosine is exactly the one written down."""
    n_img, n_c = cos.shape
    g = np.zeros((n_c, dim))
    g[:, :n_img] = cos.T
    for c in range(n_c):
        g[c, offset + c] = math.sqrt(1.0 - float((cos[:, c] ** 2).sum()))
    return g.astype(np.float32)


def test_hand_computed_two_images_three_concepts():
    # f_1 = e_0, f_2 = e_1. logit = 100·cos, so a cosine of ln(k)/100 is a logit of ln k.
    ln2, ln3 = math.log(2), math.log(3)
    # image 1: logit_yes = [0, ln2, 0]   → exp = [1, 2, 1]  → p = [1/4, 1/2, 1/4]
    #          logit_no  = [0, ln(2/3), ln3]
    #          p_no_c = e^no/(e^yes+e^no): [1/(1+1), (2/3)/(2+2/3), 3/(1+3)] = [1/2, 1/4, 3/4]
    #          Σ (1-p_no)·p = 1/2·1/4 + 3/4·1/2 + 1/4·1/4 = 2/16 + 6/16 + 1/16 = 9/16 → OOD = 7/16
    # image 2: logit_yes = [ln3, 0, 0]   → exp = [3, 1, 1]  → p = [3/5, 1/5, 1/5]
    #          logit_no  = [ln9, 0, 0]
    #          p_no = [9/(3+9), 1/2, 1/2] = [3/4, 1/2, 1/2]
    #          Σ (1-p_no)·p = 1/4·3/5 + 1/2·1/5 + 1/2·1/5 = 3/20 + 2/20 + 2/20 = 7/20 → OOD = 13/20
    cos_yes = np.array([[0, ln2, 0], [ln3, 0, 0]]) / S
    cos_no = np.array([[0, math.log(2 / 3), ln3], [math.log(9), 0, 0]]) / S
    dim = 2 + 3 + 3
    f = np.eye(2, dim, dtype=np.float32)
    g_yes, g_no = _unit_rows(cos_yes, dim, 2), _unit_rows(cos_no, dim, 5)
    expected = [7 / 16, 13 / 20]
    np.testing.assert_allclose(ood_scores(f, g_yes, g_no, scale=S), expected, atol=1e-5)
    np.testing.assert_allclose(ood_scores(f, g_yes, g_no, scale=S, concept_chunk=1, image_chunk=1),
                               expected, atol=1e-5)
    np.testing.assert_allclose(ood_scores_dense(f, g_yes, g_no, scale=S), expected, atol=1e-5)


def test_ood_b_is_clipn_atd_not_ctw_hand_computed():
    """Paper §3.3: "These probabilities are used to compute the OOD score for I with respect to the
    concept bank B: OOD_B(I) = 1 − Σ_{c∈B} (1 − p^no_{c,I})·p_{c,I}". CLIPN (xmed-lab/CLIPN,
    src/zero_shot_infer.py) scores in-distribution-ness two ways from the same model: ATD =
    Σ_c softmax([l_c, l^no_c])_yes · softmax(l)_c, CTW = softmax([l_ĉ, l^no_ĉ])_yes of ĉ = argmax l.
    OOD_B is 1 − ATD."""
    ln3 = math.log(3)
    # one image, two concepts. logit_yes = [ln3, 0] → p = [3/4, 1/4]
    # logit_no = [ln3, ln3] → p_no = [3/(3+3), 3/(1+3)] = [1/2, 3/4]
    # ATD = (1 − 1/2)·3/4 + (1 − 3/4)·1/4 = 3/8 + 1/16 = 7/16 → OOD_B = 9/16
    # CTW: ĉ = concept 0, 1 − p_no = 1/2 → 1 − CTW = 1/2 (≠ 9/16)
    cos_yes, cos_no = np.array([[ln3, 0.0]]) / S, np.array([[ln3, ln3]]) / S
    dim = 1 + 2 + 2
    f = np.eye(1, dim, dtype=np.float32)
    got = ood_scores(f, _unit_rows(cos_yes, dim, 1), _unit_rows(cos_no, dim, 3), scale=S)
    np.testing.assert_allclose(got, [9 / 16], atol=1e-6)
    assert abs(got[0] - 1 / 2) > 0.05                                 # not the CTW score


def _random_unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("concept_chunk,image_chunk", [(1, 1), (7, 5), (64, 3), (1000, 1000)])
def test_chunked_equals_dense(concept_chunk, image_chunk):
    rng = np.random.default_rng(0)
    f, g_yes, g_no = _random_unit(rng, 23, 16), _random_unit(rng, 50, 16), _random_unit(rng, 50, 16)
    # pull some images close to a concept so p_c is peaked (large logits stress the running max)
    f[:5] = g_yes[:5] + 0.05 * f[:5]
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    dense = ood_scores_dense(f, g_yes, g_no, scale=S)
    got = ood_scores(f, g_yes, g_no, scale=S, concept_chunk=concept_chunk, image_chunk=image_chunk)
    np.testing.assert_allclose(got, dense, atol=1e-5)
    assert np.all((got >= 0) & (got <= 1))


def test_invariants_and_extremes():
    rng = np.random.default_rng(1)
    f, g = _random_unit(rng, 10, 8), _random_unit(rng, 6, 8)
    # yes == no embeddings → p_no = 1/2 for every concept → OOD = 1 − 1/2·Σp = 1/2 exactly
    np.testing.assert_allclose(ood_scores(f, g, g), 0.5, atol=1e-6)
    # image equal to a concept's no-embedding and opposite to its yes-embedding: logits ±100, no overflow
    out = ood_scores(g[:1], -g[:1], g[:1], scale=S)
    assert np.isfinite(out).all() and out[0] == pytest.approx(1.0, abs=1e-6)
    # and the in-distribution extreme: image = yes-embedding of its only concept, no-embedding opposite
    assert ood_scores(g[:1], g[:1], -g[:1], scale=S)[0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="empty concept"):
        ood_scores(f, g[:0], g[:0])
    with pytest.raises(ValueError, match="shape"):
        ood_scores(f, g, g[:3])


def test_ensemble_sums_normalised_then_renormalises():
    a = np.array([[3.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 1.0], [0.0, 5.0]])
    e = ensemble([a, b])
    # row 0: (1,0)+(0,1) = (1,1) → (1/√2, 1/√2); row 1: (0,1)+(0,1) → (0,1); scale of inputs is ignored
    np.testing.assert_allclose(e, [[2 ** -0.5, 2 ** -0.5], [0.0, 1.0]], atol=1e-6)


def test_derive_generalized_concepts():
    assert derive_generalized_concepts("food", "dishes, drinks and desserts") == \
        ["food", "dishes, drinks and desserts", "dishes", "drinks", "desserts"]
    assert derive_generalized_concepts("birds", "bird species") == ["birds", "bird species"]
    assert derive_generalized_concepts("Food", "food") == ["Food"]


def test_params_validation_and_build():
    p = build(OodParams, {"ood": {"generalized_concepts": ["food", "meal"], "blur_kind": "fill"}}, "ood")
    assert p.generalized_concepts == ("food", "meal")
    with pytest.raises(ParamsError, match="models.clipn"):     # moved to the model family
        build(OodParams, {"ood": {"clipn_checkpoint": "models/clipn/x.pt"}}, "ood")
    with pytest.raises(ParamsError, match="blur_kind"):
        build(OodParams, {"ood": {"blur_kind": "pixelate"}}, "ood")
    with pytest.raises(ParamsError, match="no_templates"):
        build(OodParams, {"ood": {"no_templates": ["a photo of no thing."]}}, "ood")
    with pytest.raises(ParamsError, match="concept_chunk"):
        build(OodParams, {"ood": {"concept_chunk": 0}}, "ood")


def _text_only_case():
    """Concept 'pizza' (in B) and a far-away 'other'; the image's only in-domain cue is its text."""
    d = 6
    e = np.eye(d, dtype=np.float32)
    B = (e[[0, 1]], e[[2, 3]])                 # yes: pizza=e0, other=e1; no: e2, e3
    B_prime = (e[[0]], e[[2]])
    with_text = (0.8 * e[0] + 0.6 * e[4])      # text "PIZZA" pulls the embedding to the concept
    blurred = e[4]                              # without the text: nothing of the domain left
    plain = (0.6 * e[0] + 0.8 * e[5])           # an image without text
    return B, B_prime, with_text, blurred, plain


def test_blur_delta_zero_without_text_positive_when_text_is_the_cue():
    B, B_prime, with_text, blurred, plain = _text_only_case()
    f = np.stack([plain, with_text])
    out = three_scores(f, blurred[None], np.array([False, True]), B, B_prime, scale=S)
    assert out["ood_blur_delta"][0] == 0.0
    # I: logits yes [80, 0], no [0, 0] → p ≈ [1, 0], p_no(pizza) = σ(−80) ≈ 0 → OOD_B(I) ≈ 0
    # I': logits all 0 → p = [1/2, 1/2], p_no = 1/2 → OOD_B(I') = 1 − 1/2 = 1/2
    assert out["ood_blur_delta"][1] == pytest.approx(0.5, abs=1e-6)
    np.testing.assert_allclose(out["ood_b"], ood_scores(f, *B, scale=S))
    np.testing.assert_allclose(out["ood_bprime"], ood_scores(f, *B_prime, scale=S))
    with pytest.raises(ValueError, match="blurred embeddings"):
        three_scores(f, blurred[None][:0], np.array([False, True]), B, B_prime)


class _DarkPixelClip:
    """Stand-in CLIP: the embedding leans to 'pizza' by the fraction of black pixels (i.e. text)."""

    logit_scale = S

    def __init__(self):
        self.calls = 0
        self.e = np.eye(6, dtype=np.float32)

    def encode_images(self, images, batch_size=64):
        self.calls += len(images)
        rows = []
        for im in images:
            dark = float((np.asarray(im.convert("L")) < 60).mean())
            v = min(1.0, 20 * dark) * self.e[0] + self.e[4]
            rows.append(v / np.linalg.norm(v))
        return np.array(rows, np.float32).reshape(-1, 6)


def _font(size):
    try:
        return ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def test_score_images_real_detector_and_blur():
    from pas.curate.textblur import TextDetector

    B, B_prime, *_ = _text_only_case()
    y, x = np.mgrid[0:192, 0:256]              # a smooth gradient: no text (DBNet flags solid blobs)
    plain = Image.fromarray(np.stack([128 + x // 2, 128 + y // 2, 255 - x // 4], -1).astype(np.uint8))
    text = plain.copy()
    ImageDraw.Draw(text).text((30, 70), "PIZZA", fill="black", font=_font(48))
    clip, t = _DarkPixelClip(), Timings()
    out = score_images([plain, text], clip, TextDetector(), TextSets(B, B_prime, "negative_prompts"),
                       OodParams(), timings=t)
    assert out["text_boxes"].tolist()[0] == 0 and out["text_boxes"][1] >= 1
    assert out["ood_blur_delta"][0] == 0.0 and out["ood_blur_delta"][1] > 0.1
    assert clip.calls == 3 and t.n_encoded == 3 and t.n_images == 2   # the plain image is encoded once


# ---------------------------------------------------------------------------------------------
# the stage, on tiny synthetic inputs with the tiny seeded CLIP

def _write_shards(dir_, items, source):
    from pas.io.shards import ShardWriter, encode_image

    with ShardWriter(dir_, maxcount=2) as w:
        for key, img in items:
            w.write(key, encode_image(img), {"source": source})
    pd.DataFrame(w.rows).to_parquet(dir_ / "index.parquet")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    pytest.importorskip("open_clip")
    from pas.models.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)


def _stage_inputs(tmp_path, monkeypatch, clip_dir):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(4)]
    text_img = Image.new("RGB", (160, 96), "white")
    ImageDraw.Draw(text_img).text((10, 30), "SOUP", fill="black", font=_font(36))
    _write_shards(tmp_path / "retrieved", [("pa1", imgs[0]), ("pa2", imgs[1]), ("pa3", text_img)], "real")
    _write_shards(tmp_path / "generated", [("ga1", imgs[2]), ("ga2", imgs[3])], "synthetic")
    pd.DataFrame({"key": ["pa1", "pa2", "pa3", "ga1", "ga2"],
                  "kept": [True, False, True, True, True]}).to_parquet(tmp_path / "manifest.parquet")
    pd.DataFrame({"concept": ["pizza", "sushi", "soup", "car"],
                  "accepted": [True, True, True, False]}).to_parquet(tmp_path / "bank.parquet")
    (tmp_path / "clip").symlink_to(clip_dir, target_is_directory=True)
    ood = {"batch_size": 2, "yes_templates": ["a photo of a {}."], "no_templates": ["a photo of no {}."]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"domain": {"name": "food", "description": "dishes and drinks"}, "ood": ood}))


def _run(tmp_path, *extra):
    return load_stage("ood").main(["--manifest", str(tmp_path / "manifest.parquet"),
                     "--images", str(tmp_path / "retrieved"), str(tmp_path / "generated"),
                     "--concepts", str(tmp_path / "bank.parquet"), "--clip", str(tmp_path / "clip"),
                     "--out", str(tmp_path / "ood"), "--cache", str(tmp_path / "cache"),
                     "--params", str(tmp_path / "params.yaml"), "--metrics", str(tmp_path / "metrics.json"),
                     *extra])


def test_stage_main_scores_kept_images_and_resumes(tmp_path, monkeypatch, tiny_clip_dir):
    _stage_inputs(tmp_path, monkeypatch, tiny_clip_dir)
    assert _run(tmp_path) == 0
    df = pd.read_parquet(tmp_path / "ood" / "scores.parquet")
    assert df["key"].tolist() == ["ga1", "ga2", "pa1", "pa3"]          # kept only, sorted by key
    assert list(df.columns) == ["key", "source", "ood_b", "ood_bprime", "ood_blur_delta", "text_boxes"]
    assert df["ood_b"].between(0, 1).all() and df["ood_bprime"].between(0, 1).all()
    assert df.set_index("key").loc["pa3", "text_boxes"] >= 1
    assert (df.loc[df["text_boxes"] == 0, "ood_blur_delta"] == 0).all()
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_kept"] == 4 and m["mode"] == "negative_prompts" and m["n_concepts"] == 3
    assert m["generalized_concepts"] == ["food", "dishes and drinks", "dishes", "drinks"]
    assert m["n_with_text"] >= 1 and read_run(tmp_path / "metrics.json")["seconds_per_image"]["clip"] > 0
    # rerun: every shard resumes from its marker, scores and tracked metrics are identical
    before = (tmp_path / "ood" / "scores.parquet").read_bytes()
    tracked = (tmp_path / "metrics.json").read_bytes()
    assert _run(tmp_path) == 0
    run2 = read_run(tmp_path / "metrics.json")
    assert run2["n_shards_resumed"] == 3 and run2["n_timed"] == 0
    assert (tmp_path / "ood" / "scores.parquet").read_bytes() == before
    assert (tmp_path / "metrics.json").read_bytes() == tracked
    # the leakage stage now drops ga2: only the shard holding it is scored again
    pd.DataFrame({"key": ["pa1", "pa3", "ga1"], "kept": True}).to_parquet(tmp_path / "manifest.parquet")
    assert _run(tmp_path) == 0
    m3 = json.loads((tmp_path / "metrics.json").read_text())
    run3 = read_run(tmp_path / "metrics.json")
    assert run3["n_shards_resumed"] == 2 and run3["n_timed"] == 1 and m3["n_kept"] == 3
    df3 = pd.read_parquet(tmp_path / "ood" / "scores.parquet")
    pd.testing.assert_frame_equal(df3, df[df["key"] != "ga2"].reset_index(drop=True))


def test_stage_main_rescores_shards_whose_resume_files_are_torn(tmp_path, monkeypatch, tiny_clip_dir, caplog):
    """An empty marker, a truncated marker and a truncated part are misses (warned, naming the file):
    only those shards are scored again and the scores equal the first run's."""
    _stage_inputs(tmp_path, monkeypatch, tiny_clip_dir)
    assert _run(tmp_path) == 0
    before = (tmp_path / "ood" / "scores.parquet").read_bytes()
    parts = tmp_path / "cache"
    markers = sorted(parts.glob("*.json"))
    assert len(markers) == 3 and sorted(tmp_path.joinpath("ood").iterdir()) == [tmp_path / "ood" / "scores.parquet"]
    empty, cut = markers[:2]
    torn_part = markers[2].with_suffix(".parquet")
    empty.write_text("")
    cut.write_text(cut.read_text()[:9])
    torn_part.write_bytes(torn_part.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert _run(tmp_path) == 0
    run = read_run(tmp_path / "metrics.json")
    assert run["n_shards_resumed"] == 0 and run["n_timed"] == 4
    assert (tmp_path / "ood" / "scores.parquet").read_bytes() == before
    for f in (empty, cut, torn_part):
        assert str(f) in caplog.text
    assert not list(parts.glob(".tmp-*"))
    assert _run(tmp_path) == 0                        # the rewritten files resume again
    assert read_run(tmp_path / "metrics.json")["n_shards_resumed"] == 3


def test_stage_main_refuses_missing_kept_keys(tmp_path, monkeypatch, tiny_clip_dir):
    _stage_inputs(tmp_path, monkeypatch, tiny_clip_dir)
    pd.DataFrame({"key": ["pa1", "zz9"], "kept": [True, True]}).to_parquet(tmp_path / "manifest.parquet")
    with pytest.raises(ValueError, match="zz9"):
        _run(tmp_path)


def test_stage_main_refuses_an_empty_input(tmp_path, monkeypatch, tiny_clip_dir, caplog):
    _stage_inputs(tmp_path, monkeypatch, tiny_clip_dir)
    pd.DataFrame({"key": ["pa1", "pa2"], "kept": [False, False]}).to_parquet(tmp_path / "manifest.parquet")
    assert _run(tmp_path) == 2
    assert "keeps no image" in caplog.text and not (tmp_path / "ood").exists()


def test_stage_main_clipn_mode(tmp_path, monkeypatch, tiny_clip_dir):
    """models.clipn configured: CLIPN's base (not --clip) embeds the images and reads the yes prompts,
    its no-tower the no prompts; the scores are CLIPN's ATD formula computed here independently."""
    import torch

    from pas.io.shards import decode_image, iter_samples, list_shards
    from pas.models.clip import build_tiny_clip, load_clip
    from pas.models.clipn import load_clipn_no_encoder, read_clipn_dir
    from pas.models.specs import resolve
    from tests.standins.repos import write_clipn_checkpoint

    _stage_inputs(tmp_path, monkeypatch, build_tiny_clip(tmp_path / "other-clip", seed=5))   # --clip: not used
    ckpt = write_clipn_checkpoint(tmp_path / "epoch_10.pt", load_clip(tiny_clip_dir).model.state_dict(), seed=2)
    clipn_dir = resolve("clipn", {"kind": "clipn", "base": {"kind": "tiny", "seed": 0},
                                  "checkpoint": {"path": str(ckpt)}}, tmp_path / "models-clipn")
    assert _run(tmp_path, "--clipn", str(clipn_dir)) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["mode"] == "clipn" and m["n_kept"] == 4 and m["clipn_base_match"] is True
    df = pd.read_parquet(tmp_path / "ood" / "scores.parquet").set_index("key")

    base_dir, ckpt_file = read_clipn_dir(clipn_dir)
    base = load_clip(base_dir)
    no = load_clipn_no_encoder(ckpt_file, base)
    concepts = ["pizza", "soup", "sushi"]                        # accepted, sorted
    prompts = [f"a photo of a {c}." for c in concepts]           # CLIPN's no-tower reads the yes prompts
    ims = {s.key: decode_image(s.image) for d in ("retrieved", "generated")
           for sh in list_shards(tmp_path / d) for s in iter_samples(sh)}
    keys = ["ga1", "ga2", "pa1", "pa3"]
    f = torch.tensor(base.encode_images([ims[k] for k in keys]), dtype=torch.float64)
    logits = 100.0 * f @ torch.tensor(base.encode_texts(prompts), dtype=torch.float64).T
    logits_no = 100.0 * f @ torch.tensor(no.encode_texts(prompts), dtype=torch.float64).T
    yesno = torch.softmax(torch.stack([logits, logits_no], -1), -1)[..., 0]
    atd = (yesno * torch.softmax(logits, -1)).sum(1)
    np.testing.assert_allclose(df.loc[keys, "ood_b"].to_numpy(), 1 - atd.numpy(), atol=1e-4)


def test_scorer_encodes_its_prompts_once_with_the_clip_it_loads(tiny_clip_dir):
    """The scorer as an engine receives it (pickled, no models): `load` encodes B and B' with its own
    CLIP, once, to the same embeddings `encode_prompts` gives."""
    import pickle

    from pas.curate.ood import OodScorer, encode_prompts
    from pas.models.clip import load_clip

    p = OodParams()
    concepts, generalized = ["apple pie", "sushi", "ramen"], ["food"]
    scorer = pickle.loads(pickle.dumps(OodScorer(str(tiny_clip_dir), p, (concepts, generalized))))
    assert scorer.texts is None and scorer.prompt_info is None
    scorer.load()
    ref = encode_prompts(str(tiny_clip_dir), p, concepts, generalized, clip=load_clip(tiny_clip_dir))
    for got, want in ((scorer.texts.B, ref.texts.B), (scorer.texts.B_prime, ref.texts.B_prime)):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    info = scorer.prompt_info
    assert info["mode"] == "negative_prompts" and info["logit_scale"] == ref.logit_scale
    assert info["clipn_base_match"] is None and info["seconds"] > 0
    texts = scorer.texts
    scorer.load()
    assert scorer.texts is texts                                   # loaded and encoded once

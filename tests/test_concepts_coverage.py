"""Coverage metric: shipped reference lists, nearest-concept cosine by hand and vs brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pas.concepts.coverage import clean_class_name, coverage, histogram, load_reference
from pas.concepts.lexical import text_encoder


def test_reference_lists_shipped():
    food = load_reference("food101")
    cub = load_reference("cub200")
    assert len(food) == 101 and food[0] == "apple pie" and food[-1] == "waffles"
    assert len(cub) == 200 and cub[0] == "black footed albatross" and cub[-1] == "common yellowthroat"
    assert len(set(food)) == 101 and len(set(cub)) == 200
    assert not any(n.startswith("#") for n in food + cub)
    with pytest.raises(KeyError, match="imagenet"):
        load_reference("imagenet")


@pytest.mark.parametrize("raw, clean", [
    ("apple_pie", "apple pie"), ("001.Black_footed_Albatross", "black footed albatross"),
    ("  Eggs_benedict ", "eggs benedict"), ("Blue-winged Teal  (Male)", "blue-winged teal (male)"),
])
def test_clean_class_name(raw, clean):
    assert clean_class_name(raw) == clean


def test_coverage_hand_computed():
    s = 1 / math.sqrt(2)
    classes = np.array([[1, 0, 0], [0, 1, 0], [s, s, 0], [0, 0, 1]], dtype=np.float32)
    concepts = np.array([[1, 0, 0], [0, s, s]], dtype=np.float32)
    cov = coverage(classes, concepts, threshold=0.7)
    # class 0 → concept 0 (1.0); class 1 → concept 1 (s); class 2 → concept 0 (s vs 0.5); class 3 → 1 (s)
    assert cov.nearest.tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(cov.similarity, [1.0, s, s, s], rtol=1e-6)
    assert cov.covered == 1.0
    assert coverage(classes, concepts, threshold=0.75).covered == 0.25
    assert cov.mean_max_similarity == pytest.approx((1 + 3 * s) / 4, rel=1e-6)


def test_coverage_threshold_is_inclusive_and_empty_bank():
    c = np.array([[1.0, 0.0]], dtype=np.float32)
    assert coverage(c, c, threshold=1.0).covered == 1.0
    empty = coverage(c, np.zeros((0, 2), dtype=np.float32), threshold=0.5)
    assert empty.covered == 0.0 and empty.nearest.tolist() == [-1] and empty.mean_max_similarity == -1.0


def _unit(rows):
    a = np.asarray(rows, dtype=np.float64)
    return (a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-9)).astype(np.float32)


vec = st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=3, max_size=3).filter(
    lambda v: sum(x * x for x in v) > 1e-3)


@settings(max_examples=50, deadline=None)
@given(st.lists(vec, min_size=1, max_size=8), st.lists(vec, min_size=1, max_size=8), st.floats(-1, 1))
def test_coverage_matches_brute_force(cls_rows, con_rows, thr):
    C, K = _unit(cls_rows), _unit(con_rows)
    cov = coverage(C, K, thr)
    for i, y in enumerate(C):
        sims = [float(np.dot(y, k)) for k in K]
        assert cov.similarity[i] == pytest.approx(max(sims), abs=1e-5)
    expect = np.mean([max(float(np.dot(y, k)) for k in K) >= thr for y in C])
    assert cov.covered == pytest.approx(expect) or abs(cov.similarity - thr).min() < 1e-5


def test_histogram():
    centres, counts = histogram(np.array([-0.2, 0.0, 0.24, 0.25, 0.99, 1.0]), bins=4)
    np.testing.assert_allclose(centres, [0.125, 0.375, 0.625, 0.875])
    assert counts.tolist() == [3, 1, 0, 2]


def test_text_encoder_choices(tiny_clip_dir):
    from pas.concepts.params import ConceptsParams
    from pas.models.clip import load_clip
    from pas.params import ParamsError

    e = text_encoder("clip", clip_dir=str(tiny_clip_dir))("apple pie ramen".split())
    np.testing.assert_allclose(e, load_clip(tiny_clip_dir).encode_texts(["apple", "pie", "ramen"]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="models/clip"):
        text_encoder("clip")
    assert ConceptsParams(validator="embedding").coverage_embedder == "text_embed"   # offline default
    with pytest.raises(ParamsError, match="coverage_embedder"):
        ConceptsParams(coverage_embedder="bert")

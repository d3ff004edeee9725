"""The CLIPN-style "no" head of the offline CLIP (pas.models.no_head) and its use as ood's no-tower."""

from __future__ import annotations

import numpy as np

from pas.curate.ood import OodParams, build_text_sets
from pas.models.no_head import NoHead, load_no_head, save_no_head, train_no_head
from tests.helpers import ood_scores_dense


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _pairs(n_texts=20, per_text=10, d=16, seed=0):
    rng = np.random.default_rng(seed)
    texts = _unit(rng.standard_normal((n_texts, d)))
    ids = np.repeat(np.arange(n_texts), per_text)
    images = _unit(texts[ids] + 0.25 * rng.standard_normal((len(ids), d)).astype(np.float32))
    return images, texts, ids


def test_identity_head_is_no_information():
    # CLIPN: p^no = σ(s·(cos(f, g^no) − cos(f, g))); with g^no = g, p^no = 1/2 for every pair, so
    # OOD_B = 1 − Σ_c (1/2)·p_c = 1/2 for every image whatever p_c
    f, g, _ = _pairs()
    head = NoHead(np.eye(g.shape[1], dtype=np.float32), np.zeros(g.shape[1], np.float32))
    np.testing.assert_allclose(head(g), g, atol=1e-6)
    np.testing.assert_allclose(ood_scores_dense(f, g, head(g), scale=20.0), 0.5, atol=1e-6)


def test_training_says_no_to_other_texts_and_yes_to_its_own():
    f, g, ids = _pairs()
    W, b, m = train_no_head(f, g, ids, scale=20.0, seed=0, steps=300, batch_size=128, lr=5e-3)
    assert m["p_no_own_text"] < 0.3 and m["p_no_other_text"] > 0.6, m
    head = NoHead(W, b)
    # an image far from every concept now scores out of domain; one of a concept in domain
    far = _unit(np.random.default_rng(1).standard_normal((5, g.shape[1])).astype(np.float32))
    assert ood_scores_dense(far, g, head(g), scale=20.0).mean() > ood_scores_dense(f, g, head(g), scale=20.0).mean()
    W2, b2, _ = train_no_head(f, g, ids, scale=20.0, seed=0, steps=300, batch_size=128, lr=5e-3)
    assert np.array_equal(W, W2) and np.array_equal(b, b2)           # same seed, same head


def test_saved_head_is_ood_s_no_tower(tmp_path):
    f, g, ids = _pairs(d=8)
    W, b, _ = train_no_head(f, g, ids, scale=20.0, steps=20)
    assert load_no_head(tmp_path) is None
    save_no_head(tmp_path, W, b)
    head = load_no_head(tmp_path)
    np.testing.assert_array_equal(head.W, W)

    class Clip:                                    # a text tower: one fixed vector per prompt
        def encode_texts(self, texts, batch_size=256):
            return _unit(np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(8)
                                   for t in texts]).astype(np.float32))

    clip = Clip()
    p = OodParams(yes_templates=("a photo of a {}.",), no_templates=("a photo of no {}.",))
    ts = build_text_sets(clip, ["pho", "ramen"], ["food"], p, head.bind(clip))
    assert ts.mode == "no_head"
    yes, no = ts.B
    # the no head reads the yes templates, as CLIPN's no-tower does
    np.testing.assert_allclose(no, head(yes), atol=1e-6)

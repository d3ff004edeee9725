"""Concept coverage of reference label sets (the paper's Figures 3–4 as numbers).

For each class name y of a reference dataset: s(y) = max_{c ∈ B} cos(E(y), E(c)) with text
embeddings E; the set's coverage is the fraction of classes with s(y) ≥ threshold, reported with the
mean of s(y). E is `concepts.coverage_embedder`: "clip" is the paper's ("we compute the CLIP ViT-L/14
lexical embeddings": the text tower of `models/clip`, the paper presets), "text_embed" the sentence
embedder of `models/text_embed` (MiniLM offline: cheap, and meaningful where the offline CLIP is a
random-init tiny model). Cosines of the two are not comparable, so neither are their thresholds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

# name -> (file in pas/resources, dataset)
REFERENCES = {
    "food101": ("food101_classes.txt", "Food-101"),
    "cub200": ("cub200_classes.txt", "CUB-200-2011"),
}


EMBEDDERS = ("text_embed", "clip")   # E: pas.concepts.lexical.text_encoder


def clean_class_name(raw: str) -> str:
    """Dataset spelling → words: 'apple_pie' → 'apple pie', '001.Black_footed_Albatross' →
    'black footed albatross'."""
    s = re.sub(r"^\d+\.", "", raw.strip())
    s = s.replace("_", " ")
    return " ".join(s.split()).casefold()


def load_reference(name: str) -> list[str]:
    """Cleaned class names of a shipped reference set (label order; '#' lines are provenance notes)."""
    if name not in REFERENCES:
        raise KeyError(f"unknown reference set {name!r} (known: {sorted(REFERENCES)})")
    text = resources.files("pas.resources").joinpath(REFERENCES[name][0]).read_text(encoding="utf-8")
    return [clean_class_name(ln) for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@dataclass
class Coverage:
    nearest: np.ndarray     # (M,) index of the nearest concept per class (-1 if no concepts)
    similarity: np.ndarray  # (M,) cosine to it (-1 if no concepts)
    covered: float          # fraction of classes with similarity ≥ threshold
    mean_max_similarity: float


def coverage(class_emb: np.ndarray, concept_emb: np.ndarray, threshold: float) -> Coverage:
    """Nearest concept per class by cosine; both inputs L2-normalised, (M, d) and (K, d)."""
    m = class_emb.shape[0]
    if concept_emb.shape[0] == 0 or m == 0:
        sim = np.full(m, -1.0, dtype=np.float32)
        return Coverage(np.full(m, -1), sim, 0.0, float(sim.mean()) if m else 0.0)
    s = class_emb @ concept_emb.T                # (M, K) cosine
    nearest = s.argmax(axis=1)                   # first max on ties
    sim = s[np.arange(m), nearest]
    return Coverage(nearest, sim, float((sim >= threshold).mean()), float(sim.mean()))


def histogram(similarity: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of nearest-concept cosines in `bins` equal bins over [0, 1] (values < 0 fall in the first,
    1.0 in the last); returns (bin centres, counts)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.floor(np.asarray(similarity, dtype=np.float64) * bins), 0, bins - 1).astype(int)
    counts = np.bincount(idx, minlength=bins)
    return (edges[:-1] + edges[1:]) / 2, counts

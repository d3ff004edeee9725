"""Text encoders E of the coverage numbers (`concepts.coverage_embedder`, see pas.concepts.coverage).

Apart from coverage.py because params validation imports that module from every stage: the model
loaders imported here stay out of the other stages' dependency closure.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from pas.concepts.coverage import EMBEDDERS


def text_encoder(kind: str, *, text_embed=None, clip_dir: str | None = None,
                 device: str = "cpu") -> Callable[[Sequence[str]], np.ndarray]:
    """E for the coverage numbers: texts → (n, d) L2-normalised float32.

    kind "clip": `pas.models.clip.load_clip(clip_dir).encode_texts` on the raw names (lexical
    embeddings, no prompt template); "text_embed": the loaded sentence-transformers `text_embed`.
    """
    if kind == "clip":
        if clip_dir is None:
            raise ValueError("coverage_embedder clip needs the CLIP folder (models/clip)")
        from pas.models.clip import load_clip

        clip = load_clip(clip_dir, device=device)
        return lambda texts: np.asarray(clip.encode_texts(list(texts)), dtype=np.float32)
    if kind == "text_embed":
        if text_embed is None:
            raise ValueError("coverage_embedder text_embed needs the loaded sentence embedder")
        from pas.models.text_embed import embed_texts

        return lambda texts: np.asarray(embed_texts(text_embed, list(texts)), dtype=np.float32)
    raise ValueError(f"coverage_embedder={kind!r}: expected one of {EMBEDDERS}")

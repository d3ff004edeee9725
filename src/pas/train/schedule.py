"""Learning-rate schedules and optimiser set-up shared by the training loops (pretrain, the offline
CLIP and SSCD)."""

from __future__ import annotations

import math


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float, schedule: str) -> float:
    """Per-step LR multiplier: linear warmup over warmup_epochs, then cosine to 0 (or constant)."""
    warm = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def adamw(params, lr: float, weight_decay: float):
    """AdamW that decays weight matrices and kernels (ndim >= 2) only, not biases, norms or scales."""
    import torch

    params = list(params)
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)

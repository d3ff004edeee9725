"""Learning-rate schedules shared by every training loop (pretrain, the offline CLIP and SSCD)."""

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

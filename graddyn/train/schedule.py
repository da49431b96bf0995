"""The learning-rate schedule the reference builds share: linear warm-up, cosine decay."""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm up linearly over `warmup_fraction` of the steps, then decay to zero on a cosine.

    Step `s < w` (w = warm-up steps, at least 1) uses `(s + 1) / w` of the base rate; later
    steps use `0.5 · (1 + cos(π · (s - w) / (total - w)))`.
    """
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

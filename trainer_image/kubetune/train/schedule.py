"""Learning-rate schedule: linear warmup over warmupRatio of the steps, then cosine, linear or constant."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_ratio: float, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    warmup = int(math.ceil(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def scheduler_factory(total_steps: int, warmup_ratio: float, kind: str):
    """A callable DeepSpeed turns into the engine's scheduler (so checkpoints carry its state)."""
    from torch.optim.lr_scheduler import LambdaLR

    return lambda optimizer: LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_ratio, kind))

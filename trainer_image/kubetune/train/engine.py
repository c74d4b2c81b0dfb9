"""The pieces the recipe builds its DeepSpeed engine from (stage 0 is plain data parallel)."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Optional

from ..planner.zero_sizes import model_hidden_size
from .deepspeed_config import ADAM_BETAS, ADAM_EPS, uses_client_optimizer


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def zero3_loading(ds_config: dict):
    """Under ZeRO-3, an HfDeepSpeedConfig that makes transformers build the model already
    partitioned (deepspeed.zero.Init); keep it alive until the engine exists. None otherwise."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def hidden_size(model_dir: Path) -> Optional[int]:
    """The model's hidden size (config.json), which sizes the ZeRO buffers; None if unknown."""
    try:
        return model_hidden_size(json.loads((Path(model_dir) / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None


def build_engine(model, ds_config: dict, learning_rate: float, weight_decay: float, total_steps: int, warmup_ratio: float, lr_scheduler: str):
    """The DeepSpeed engine over `model`: our AdamW (param groups with and without weight
    decay) unless the config names DeepSpeed's own optimizer, and transformers' LR schedule
    (linear warmup over warmupRatio of the steps, then cosine, linear or constant) as the
    engine's scheduler, so checkpoints carry its state."""
    import deepspeed
    import torch
    from transformers import get_scheduler

    groups = param_groups(model, weight_decay)
    optimizer = None
    if uses_client_optimizer(ds_config):
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=optimizer,
        lr_scheduler=partial(get_scheduler, "constant_with_warmup" if lr_scheduler == "constant" else lr_scheduler,
                             num_warmup_steps=math.ceil(warmup_ratio * total_steps), num_training_steps=total_steps),  # fmt: skip
        config=ds_config,
    )
    return engine


def grad_norm(model) -> float:
    """L2 norm of all gradients (already averaged across ranks at the accumulation boundary)."""
    import torch

    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

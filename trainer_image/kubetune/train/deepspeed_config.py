"""The DeepSpeed config generated from a job's few high-level fields (pure, no imports of torch).

stage 0-3, offload none|optimizer|all, precision, micro batch, accumulation and clipping come
from the spec; spec.distributed.deepspeedConfig is merged on top (dicts merge key by key,
everything else replaces), for experts who need a knob KubeTune does not name.

Without offload the trainer passes its own torch AdamW (param groups with and without weight
decay). With offload on GPUs, DeepSpeed builds its CPU Adam from the "optimizer" section
here (a torch optimizer steps host-memory parameters several times slower). On machines
without a GPU the torch AdamW is kept (`zero_force_ds_cpu_optimizer: false`): everything is
in host memory anyway, and DeepSpeed's CPU Adam would first need a C++ compile.

ZeRO buffers are sized from the model's hidden size (kubetune/planner/zero_sizes.py says why; the
memory planner counts the same sizes).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from ..api.spec import FineTuneJobSpec
from ..planner.zero_sizes import zero_buffer_sizes

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(spec: FineTuneJobSpec, world_size: int, precision: str, on_gpu: bool, hidden_size: Optional[int] = None) -> dict[str, Any]:
    """DeepSpeed config for `spec` with `world_size` processes; precision is fp32|fp16|bf16 (resolved);
    hidden_size (the model's) sizes the ZeRO buffers. spec.distributed.deepspeedConfig wins over all of it."""
    training, zero = spec.training, spec.distributed.zero
    offload_optimizer = zero.offload in ("optimizer", "all")
    zero_section: dict[str, Any] = {"stage": zero.stage}
    if zero.stage >= 2:
        zero_section.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_scatter=True)
    zero_section.update(zero_buffer_sizes(zero.stage, hidden_size))
    if offload_optimizer:
        zero_section["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if zero.offload == "all":
        zero_section["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if zero.stage == 3:
        # Lets export gather full 16-bit weights on rank 0 (export.save_trained).
        zero_section["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.micro_batch_size * training.gradient_accumulation_steps * world_size,
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": zero_section,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer and not on_gpu:
        config["zero_force_ds_cpu_optimizer"] = False
    elif offload_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": training.learning_rate, "betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay": training.weight_decay},
        }
    return deep_merge(config, spec.distributed.deepspeed_config)


def uses_client_optimizer(config: dict[str, Any]) -> bool:
    """True when the trainer must pass its own optimizer (no "optimizer" section in the config)."""
    return "optimizer" not in config

"""ZeRO buffer sizes: what the trainer writes into DeepSpeed's config and the memory planner
counts (pure, no torch). Kept outside `train/` so the planner, which the operator uses for its
memory check, does not reach into the trainer.

The buffers are sized from the model's hidden size h, as Hugging Face's "auto" values are
(reduce bucket h^2, ZeRO-3 prefetch bucket 0.9 h^2, persistence threshold 10 h), instead of
DeepSpeed's defaults, which are sized for billion-parameter models (a 5e8-element reduce
bucket, up to 1e9 parameters kept gathered): with those, a ZeRO-3 rank of any model under a
billion parameters ends up holding every parameter gathered between forward and backward,
plus a gradient buffer the size of its whole partition, and needs more memory than plain
data parallelism. The number of parameters kept gathered (`stage3_max_live_parameters`,
`stage3_max_reuse_distance`) and the optimizer sub-group (`sub_group_size`, which bounds
ZeRO-3's fp32 gradient buffer) are one decoder layer's worth, about 12 h^2.
"""

from __future__ import annotations

from typing import Optional

# DeepSpeed's own defaults (zero_optimization.reduce_bucket_size, stage3_prefetch_bucket_size),
# which apply where the trainer sets none (stages 0-1, or a model config without hidden_size).
REDUCE_BUCKET_ELEMENTS = 500_000_000
STAGE3_PREFETCH_ELEMENTS = 50_000_000


# Where a config.json gives the hidden size (Llama/Qwen/ChatGLM, GPT-2, T5 naming): the
# planner's model shape reads the same keys, so both size the buffers from one number.
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")


def model_hidden_size(model_config: dict) -> Optional[int]:
    """The hidden size of a model's config.json (or of its text_config, or the largest of
    hidden_sizes); None if it has none (DeepSpeed's default buffer sizes then apply)."""
    for config in (model_config, model_config.get("text_config") or {}):
        for key in HIDDEN_SIZE_KEYS:
            if isinstance(config.get(key), int) and not isinstance(config[key], bool) and config[key] > 0:
                return config[key]
        if isinstance(config.get("hidden_sizes"), list) and config["hidden_sizes"] and all(isinstance(h, int) for h in config["hidden_sizes"]):
            return max(config["hidden_sizes"])
    return None


def zero_buffer_sizes(stage: int, hidden_size: Optional[int]) -> dict[str, int]:
    """ZeRO bucket and gathering limits (elements) derived from the model's hidden size (see
    the module docstring); empty without a hidden size (DeepSpeed's defaults then apply)."""
    if not hidden_size or stage < 2:
        return {}
    sizes = {"reduce_bucket_size": hidden_size * hidden_size}
    if stage == 3:
        layer = 12 * hidden_size * hidden_size
        sizes.update(
            stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
            stage3_param_persistence_threshold=10 * hidden_size,
            stage3_max_live_parameters=layer,
            stage3_max_reuse_distance=layer,
            sub_group_size=layer,
        )
    return sizes

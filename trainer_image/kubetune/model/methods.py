"""Fine-tuning methods: which parameters train, and the adapters that carry them.

freeze  - only parameters whose names contain a pattern (or the last N blocks) train
lora    - low-rank adapters on named linear layers (or every linear layer: all-linear)
qlora   - LoRA on a 4/8-bit bitsandbytes base (CUDA only; refused before loading otherwise)
ptuning - P-tuning v2: trainable prefix keys/values at every layer (peft prefix tuning),
          optionally reparameterized through an MLP (prefixProjection)
prompt  - trainable virtual tokens at the input only (peft prompt tuning)
full    - every parameter
method.adapterUri continues from an existing LoRA: merged into the base, then a new LoRA.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..api.spec import FineTuneJobSpec

log = logging.getLogger(__name__)


class MethodError(ValueError):
    """The method cannot run with these settings or on this machine."""


def check_method_runtime(spec: FineTuneJobSpec) -> None:
    """Refuse combinations that cannot work, before anything is loaded."""
    method, training = spec.method.type, spec.training
    if method == "qlora":
        import torch

        if not torch.cuda.is_available():
            raise MethodError(
                "method.type qlora quantizes the base model with bitsandbytes, which needs a CUDA GPU; "
                "this machine has none. Use method.type lora to train the same adapters unquantized."
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise MethodError("method.type qlora needs the bitsandbytes package in the trainer image (pip install bitsandbytes)") from None
    if method == "ptuning" and training.gradient_checkpointing:
        raise MethodError(
            "method.type ptuning cannot be combined with training.gradientCheckpointing: the prefix is fed "
            "to every layer as a key/value cache, which checkpointed layers cannot recompute; "
            "set training.gradientCheckpointing: false (the prefix itself needs little memory)"
        )
    if method in ("ptuning", "prompt") and training.packing:
        raise MethodError(
            f"method.type {method} cannot be combined with training.packing: virtual tokens would be shared "
            f"by every sample in a packed row; set training.packing: false"
        )


def quantization_config(spec: FineTuneJobSpec):
    if spec.method.type != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    bits = spec.method.settings().bits
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def num_layers(config) -> int:
    for name in ("num_hidden_layers", "num_layers", "n_layer"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise MethodError("method.freeze.lastLayers: the model config does not say how many layers it has; use trainableModules")


def freeze_patterns(spec: FineTuneJobSpec, config) -> list[str]:
    settings = spec.method.freeze
    patterns = list(settings.trainable_modules)
    if settings.last_layers is not None:
        total = num_layers(config)
        if settings.last_layers > total:
            raise MethodError(f"method.freeze.lastLayers is {settings.last_layers} but the model has only {total} layers")
        patterns += [f"layers.{i}." for i in range(total - settings.last_layers, total)]
    return patterns


def _apply_freeze(model, spec: FineTuneJobSpec):
    patterns = freeze_patterns(spec, model.config)
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(pattern in n for n in names):
            raise MethodError(
                f"method.freeze.trainableModules: {pattern!r} matches no parameter; names look like {names[len(names) // 2]!r}"
            )
    for name, param in model.named_parameters():
        param.requires_grad_(any(p in name for p in patterns))
    return model


def _lora_config(settings):
    from peft import LoraConfig, TaskType

    targets = settings.target_modules
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
    )


def _apply_lora(model, spec: FineTuneJobSpec, adapter_dir: Optional[Path]):
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    quantized = spec.method.type == "qlora"
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.training.gradient_checkpointing)
    if adapter_dir is not None and quantized:
        # A quantized base cannot absorb a merge losslessly: keep training the given adapter.
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        log.info("merged the adapter from method.adapterUri into the base; training a new LoRA on top")
    field = f"method.{spec.method.type}.targetModules"
    try:
        return get_peft_model(model, _lora_config(spec.method.settings()))
    except ValueError as err:
        raise MethodError(f"{field}: {err}") from None


def _apply_prompt_learning(model, spec: FineTuneJobSpec, model_dir: Path):
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    settings = spec.method.settings()
    if spec.method.type == "ptuning":
        config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=settings.pre_seq_len,
            prefix_projection=settings.prefix_projection,
            encoder_hidden_size=settings.projection_hidden_size or model.config.hidden_size,
        )
    else:
        init = {}
        if settings.init_text:
            init = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=settings.init_text, tokenizer_name_or_path=str(model_dir))
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.virtual_tokens, **init)
    return get_peft_model(model, config)


def apply_method(model, spec: FineTuneJobSpec, model_dir: Path, adapter_dir: Optional[Path] = None):
    """Return the model to train with exactly the method's parameters requiring gradients."""
    method = spec.method.type
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if method == "freeze":
        return _apply_freeze(model, spec)
    if method in ("lora", "qlora"):
        return _apply_lora(model, spec, adapter_dir)
    return _apply_prompt_learning(model, spec, model_dir)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned parameters count whole."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total

"""Load the tokenizer and base model from the local folder `materialize_model` produced."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from ..api.spec import FineTuneJobSpec
from ..data.tokenize import install_chat_template

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_precision(precision: str) -> str:
    """`auto` is bf16 on CUDA GPUs that support it, else fp32 (CPU runs are fp32)."""
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def load_tokenizer(model_dir: Path, spec: FineTuneJobSpec):
    """The base model's tokenizer with a pad token and the chat template the job asks for."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss (labels -100) nor attention (mask 0).
        tokenizer.pad_token = tokenizer.eos_token
    if spec.dataset.format != "text":
        install_chat_template(tokenizer, spec.model.chat_template, spec.model.uri)
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(model_dir: Path, spec: FineTuneJobSpec, precision: str, quantization=None):
    """The base causal LM in the training dtype (or quantized for QLoRA).

    Under ZeRO-3 (a live HfDeepSpeedConfig with stage 3, see train.loop) the model is built
    already partitioned and its weights are streamed in one module at a time
    (`load_partitioned`): no rank ever holds the whole model or its state dict."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    dtype = getattr(torch, DTYPES[precision])
    model = None
    if quantization is None and is_deepspeed_zero3_enabled():
        model = load_partitioned(model_dir, dtype, spec.model.trust_remote_code)
    if model is None:
        kwargs = dict(dtype=dtype, trust_remote_code=spec.model.trust_remote_code)
        if quantization is not None:
            kwargs["quantization_config"] = quantization
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    if spec.training.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so frozen embeddings are fine.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def safetensors_files(model_dir: Path) -> Optional[dict[str, Path]]:
    """{checkpoint key: safetensors file} of a model folder, or None if its weights are not
    (only) safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return {key: model_dir / name for key, name in weight_map.items()} or None
    single = model_dir / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {key: single for key in f.keys()}


def load_partitioned(model_dir: Path, dtype, trust_remote_code: bool):
    """Under ZeRO-3: build the model partitioned (transformers wraps from_config in
    deepspeed.zero.Init), then copy the checkpoint in one module at a time: the module's
    parameters are gathered, rank 0 reads just their tensors from the memory-mapped
    safetensors files, and leaving GatheredParameters broadcasts and re-partitions them.
    Transformers' own ZeRO-3 loading reads the whole state dict on rank 0 first.

    None (the caller then uses from_pretrained) when the weights are not safetensors or their
    names are not exactly the model's (checkpoints that need transformers' key conversions)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    files = safetensors_files(model_dir)
    if files is None:
        log.warning("%s has no safetensors weights: under ZeRO-3 rank 0 loads the whole state dict first", model_dir)
        return None
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(files))
    if missing:
        log.warning("checkpoint names differ from the model's (%s ...): loading through transformers, which under ZeRO-3 "
                    "reads the whole state dict on rank 0", ", ".join(missing[:3]))
        del model, params
        return None
    buffers = {name: buf for name, buf in model.named_buffers() if name in files}
    reader = dist.get_rank() == 0

    def copy_in(pairs) -> None:
        # The file is mapped only while one module is read: a mapping kept open would keep
        # every page read so far resident (counted in the rank's RSS) until the end.
        for path in {files[key] for key, _ in pairs}:
            with safe_open(str(path), framework="pt") as f:
                for key, target in pairs:
                    if files[key] == path:
                        target.copy_(f.get_tensor(key))

    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            own = [(prefix + name, p) for name, p in module.named_parameters(recurse=False) if prefix + name in params]
            for key, _ in own:
                params.pop(key)  # a tied parameter is loaded once
            if own:
                with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                    if reader:
                        copy_in(own)
            # Buffers are not partitioned: every rank reads its own.
            copy_in([(prefix + name, buf) for name, buf in module.named_buffers(recurse=False) if prefix + name in buffers])
    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model

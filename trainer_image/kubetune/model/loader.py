"""Load the tokenizer and base model from the local folder `materialize_model` produced."""

from __future__ import annotations

import logging
from pathlib import Path

from ..spec import FineTuneJobSpec
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
    """The base causal LM in the training dtype (or quantized for QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=getattr(torch, DTYPES[precision]), trust_remote_code=spec.model.trust_remote_code)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    if spec.training.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so frozen embeddings are fine.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model

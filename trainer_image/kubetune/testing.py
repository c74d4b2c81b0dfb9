"""Test helpers: a tiny Llama model and tokenizer built offline from a config, for tests,
benchmarks and the CPU demo. Product code never imports this module; the real components
the tests also use live in the product (kubetune.artifacts.embedded_s3.SeaweedS3, kubetune.artifacts.net.free_port).

Nothing here downloads anything. Importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .data.tokenize import CHATML_TEMPLATE

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained language model to a new task.",
    "Question: What is the capital of France? Answer: Paris.",
    "LoRA trains low-rank adapters; the base weights stay frozen.",
    "Kubernetes runs containers in pods scheduled on nodes.",
    "DeepSpeed ZeRO partitions optimizer states, gradients and parameters.",
    "你好，世界。今天天气很好，我们一起去公园散步吧。",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "system user assistant human gpt instruction input output response prompt history",
]


def build_tiny_tokenizer(vocab_size: int = 512, chat_template: Optional[str] = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer trained on inline text, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def build_tiny_model(dest: str | Path, seed: int = 0, chat_template: Optional[str] = CHATML_TEMPLATE, **config_overrides) -> Path:
    """Write a tiny Llama model + tokenizer (+ generation config) to dest, loadable with from_pretrained."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(chat_template=chat_template)
    config = tiny_llama_config(
        len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=32).save_pretrained(dest)
    return dest

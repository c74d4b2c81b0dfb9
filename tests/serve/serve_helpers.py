"""Helpers shared by the serving tests (imported as a module next to them)."""

from __future__ import annotations


def reference_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_ids, **kwargs) -> list[int]:
    """What `model.generate` (greedy unless kwargs say otherwise) produces, cut before the first EOS."""
    import torch

    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        **kwargs,
    )  # fmt: skip
    new = out[0, len(prompt_ids) :].tolist()
    for i, token in enumerate(new):
        if token in eos_ids:
            return new[:i]
    return new


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def openai_client(url: str, api_key: str = "unused"):
    from openai import OpenAI

    # No retries: a 429 or 5xx must reach the test as it is.
    return OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)

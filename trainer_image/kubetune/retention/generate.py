"""Greedy answers to many prompts, batched and split across the ranks, gathered on every rank.

Batches are formed from the whole prompt list, sorted by prompt length (less padding), and
batch b goes to rank b % world. A batch's composition therefore does not depend on the
number of ranks, so the answers do not either (left padding with an attention mask changes
the numbers slightly, and greedy decoding could amplify that). Under ZeRO-3 every forward
pass gathers parameters from all ranks, so every rank must call generate equally often and
decode the same number of steps: a rank short of a batch repeats its first one (answers
discarded) and `synced` makes generate keep stepping until every rank is done.

With `top_k` (the replay prompts) each answer also keeps the base model's next-token
distribution at each of its tokens, from the logits the generation computed anyway, kept to
the k most likely tokens (BaseTargets): what replay.loss kl trains toward (train/loss.py).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from ..data.tokenize import BaseTargets


@dataclass(frozen=True)
class Answer:
    ids: list[int]  # generated token ids, up to and including the end-of-turn token when finished
    text: str  # decoded without special tokens
    finished: bool  # ended with an end-of-turn token within max_new_tokens
    targets: Optional[BaseTargets] = field(default=None, compare=False)  # per token of `ids`, with top_k


def batch_plan(lengths: list[int], batch_size: int, world: int) -> list[tuple[list[list[int]], int]]:
    """For each rank, (its batches of prompt indices, how many of them are its own): every rank
    gets the same number of batches, fillers (a copy of batch 0, answers discarded) last."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    per_rank = [batches[r::world] for r in range(world)]
    rounds = max((len(b) for b in per_rank), default=0)
    return [(mine + [batches[0]] * (rounds - len(mine)), len(mine)) for mine in per_rank]


def cut_answer(generated: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """The answer up to and including its first stop token, and whether it had one."""
    for k, token in enumerate(generated):
        if token in stop_ids:
            return generated[: k + 1], True
    return generated, False


def stop_token_ids(tokenizer, model) -> set[int]:
    """End-of-turn tokens: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else ({configured} if configured is not None else set())
    return ids


def greedy_batch(model, prompts: list[list[int]], pad_id: int, stop_ids: set[int], max_new_tokens: int, synced: bool, device,
                 top_k: int = 0) -> list[tuple[list[int], Optional[BaseTargets]]]:  # fmt: skip
    """Per prompt of one left-padded batch: the generated ids (padding and all), and with
    `top_k` the distribution each was drawn from (kept to its top_k tokens, on the CPU)."""
    import torch

    from ..train.loss import top_k_distribution

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=sorted(stop_ids),
        use_cache=True,
        synced_gpus=synced,
        return_dict_in_generate=True,
        output_logits=bool(top_k),  # the model's own logits, before any logits processor
    )
    generated = out.sequences[:, width:].tolist()
    if not top_k:
        return [(g, None) for g in generated]
    steps = [top_k_distribution(logits, top_k) for logits in out.logits]  # per step: ids [batch, k], logp [batch, k+1]
    top_ids = torch.stack([s[0] for s in steps], dim=1).cpu()
    logp = torch.stack([s[1] for s in steps], dim=1).cpu()
    return [(g, BaseTargets(top_ids[i], logp[i])) for i, g in enumerate(generated)]


def _all_gather(obj, world: int) -> list:
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


Share = dict[int, tuple[list[int], bool, Optional[BaseTargets]]]


def answer_share(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, rank: int, world: int, synced: bool, device,
                 top_k: int = 0) -> Share:  # fmt: skip
    """This rank's share of the answers: {prompt index: (answer ids, finished, targets with top_k)}."""
    import torch

    stop_ids = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mine: Share = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches, own = batch_plan([len(p) for p in prompts], batch_size, world)[rank]
            for k, batch in enumerate(batches):
                generated = greedy_batch(model, [prompts[i] for i in batch], pad_id, stop_ids, max_new_tokens, synced, device, top_k)
                if k < own:
                    for i, (ids, targets) in zip(batch, generated):
                        answer, finished = cut_answer(ids, stop_ids)
                        mine[i] = (answer, finished, None if targets is None else targets.head(len(answer)).copy())
    finally:
        model.train(was_training)
    return mine


def answer_all(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, rank: int, world: int, synced: bool, device,
               top_k: int = 0) -> list[Answer]:  # fmt: skip
    """Greedy answers to every prompt (token ids), computed across the ranks, returned on every
    rank; with `top_k`, each with the base model's distributions at its tokens."""
    if not prompts:
        return []
    answers: Share = {}
    for share in _all_gather(answer_share(model, tokenizer, prompts, max_new_tokens, batch_size, rank, world, synced, device, top_k), world):
        answers.update(share)
    return [Answer(ids, tokenizer.decode(ids, skip_special_tokens=True).strip(), finished, targets) for ids, finished, targets in (answers[i] for i in range(len(prompts)))]


def inference_config(ds_config: dict) -> dict:
    """The training DeepSpeed config without optimizer and scheduler (ZeRO-Inference)."""
    return {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}


@contextlib.contextmanager
def generation_model(build: Callable[[], object], ds_config: dict, world: int) -> Iterator[tuple[object, bool]]:
    """(model, synced): the model training starts from, built by `build`, ready to generate;
    freed on exit. Under ZeRO-3 it is built partitioned and wrapped in a DeepSpeed engine
    without optimizer, whose hooks gather each layer's parameters for its forward pass."""
    engine: Optional[object] = None
    if ds_config["zero_optimization"]["stage"] != 3:
        model = build()
    else:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        config = inference_config(ds_config)
        zero3_loading = HfDeepSpeedConfig(config)  # noqa: F841 - transformers builds partitioned models while it lives
        engine, *_ = deepspeed.initialize(model=build(), config=config)
        del zero3_loading
        model = engine.module
    try:
        yield model, engine is not None and world > 1
    finally:
        if engine is not None:
            engine.destroy()
        del model, engine
        gc.collect()

"""One optimizer step with the trainer's token-weighted loss, under torchrun (gloo, CPU), for
ZeRO stages 0-3 with padded and with packed rows of mixed lengths; compared with the gradient
of the whole step's rows in one plain forward/backward pass (the mean over all their answer
tokens). Used by tests/trainer/test_token_loss.py; writes JSON lines to --out on rank 0.

SGD with learning rate 1 and no clipping makes the update the gradient itself: after the step,
before - after = the gradient DeepSpeed applied, whatever the stage keeps where.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from kubetune.data.batching import BatchPlan, collate, model_inputs, rows_from_samples
from kubetune.data.tokenize import IGNORE, Sample
from kubetune.train.loss import LossWindow, TokenWeighting, forward_backward

MICRO = 2
MAX_LENGTH = 48


def mixed_samples(n: int, vocab: int, seed: int) -> list[Sample]:
    """Samples of 4-40 tokens whose answers are 1 token to most of the sample."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        length = rng.choice([4, 6, 9, 14, 22, 31, 40])
        prompt = rng.randint(1, length - 1)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        samples.append(Sample(ids, [IGNORE] * prompt + ids[prompt:]))
    return samples


def full_parameters(engine) -> dict[str, torch.Tensor]:
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().clone() for n, p in params.items()}


def engine_step(model_dir: str, stage: int, accumulation: int, rows, batches, step_tokens: int):
    """The trainer's micro-step code on this rank's micro batches of one step; returns
    (gradient applied, logged loss)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": MICRO * accumulation * dist.get_world_size(),
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    before, weighting, window = full_parameters(engine), TokenWeighting.of(engine), LossWindow()
    for micro in batches:
        batch = collate([rows[i] for i in micro], pad_id=0)
        loss = forward_backward(engine, model_inputs(batch), batch["trained_tokens"], step_tokens, weighting)
        engine.step()
        window.add(loss, batch["trained_tokens"], batch["num_tokens"])
    after = full_parameters(engine)
    logged, _ = window.totals(torch.device("cpu"))
    return {n: before[n] - after[n] for n in before}, logged


def one_pass(model_dir: str, step_rows, micro_batches=None):
    """Gradient and loss of the step's rows in one pass (token mean); with micro_batches, of
    the old weighting instead (each micro batch's mean, averaged)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    groups = [step_rows] if micro_batches is None else micro_batches
    total = 0.0
    for rows in groups:
        loss = model(**model_inputs(collate(rows, pad_id=0))).loss / len(groups)
        loss.backward()
        total += float(loss)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, total


def check(model_dir: str, stage: int, packed: bool, accumulation: int) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    samples = mixed_samples(6 * MICRO * accumulation * world, vocab, seed=11)
    rows = rows_from_samples(samples, MAX_LENGTH, packed, seed=5)
    plan = BatchPlan(len(rows), MICRO, accumulation, world)
    order = plan.epoch_order(seed=3, epoch=0, shuffle=True, lengths=[len(r) for r in rows])
    step_tokens = plan.step_sums(order, [r.trained_tokens for r in rows])[0]
    applied, logged = engine_step(model_dir, stage, accumulation, rows, plan.deal(order, rank)[:accumulation], step_tokens)
    step_rows = [rows[i] for i in order[: plan.rows_per_step]]
    expected, expected_loss = one_pass(model_dir, step_rows)
    old, _ = one_pass(model_dir, step_rows, [step_rows[k : k + MICRO] for k in range(0, len(step_rows), MICRO)])
    scale = max(float(g.abs().max()) for g in expected.values())
    return {
        "stage": stage,
        "packed": packed,
        "world_size": world,
        "rows_per_step": plan.rows_per_step,
        "micro_batch_tokens": [collate(step_rows[k : k + MICRO], 0)["trained_tokens"] for k in range(0, len(step_rows), MICRO)],
        "max_gradient": scale,
        "error": max(float((applied[n] - expected[n]).abs().max()) for n in expected) / scale,
        "old_weighting_error": max(float((old[n] - expected[n]).abs().max()) for n in expected) / scale,
        "logged_loss": logged,
        "one_pass_loss": expected_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    results = [check(args.model, stage, packed, args.accumulation) for stage in (0, 1, 2, 3) for packed in (False, True)]
    if int(os.environ["RANK"]) == 0:
        with open(args.out, "w") as out:
            out.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()

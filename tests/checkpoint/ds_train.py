"""A minimal DeepSpeed LoRA training loop around CheckpointManager, independent of
kubetune.train, run under torchrun by the random-kill tests (tests/faults). It starts in a
few seconds less than the trainer and saves every `--every` steps (uploads in the background,
the last checkpoint committed before it returns).

Data and dropout come from the global torch RNG (seeded per rank), so an exact resume needs
model, optimizer, scheduler *and* RNG restored. Rank 0 prints JSON lines on stdout; the
final weights (gathered under ZeRO-3) go to --weights-out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import deepspeed
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from kubetune.artifacts.checkpoint import CheckpointManager, RetryPolicy
from kubetune.train.export import full_state_dict


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--local-dir", required=True, help="per-node staging; '{rank}' gives each rank its own 'node'")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--weights-out")
    return p.parse_args()


def build(args):
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * int(os.environ.get("WORLD_SIZE", "1")),
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": args.steps, "warmup_max_lr": 1e-2}},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
    return engine


def main() -> int:
    args = parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    engine = build(args)
    vocab = engine.module.config.vocab_size
    manager = CheckpointManager(
        args.ckpt,
        keep=args.keep,
        local_dir=args.local_dir.format(rank=rank),
        rank=rank,
        world_size=world,
        retry=RetryPolicy(attempts=3, first_delay=0.5),
    )

    def emit(**event) -> None:
        if rank == 0:
            print(json.dumps(event), flush=True)

    torch.manual_seed(args.seed * 1000 + rank)
    step = 0
    state = manager.resume(engine)
    if state is not None:
        step = state["step"]
        emit(event="resume", **{"from": manager.loaded}, step=step)

    while step < args.steps:
        ids = torch.randint(0, vocab, (2, 16))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        step += 1
        emit(event="step", step=step, loss=loss.item())
        time.sleep(args.step_sleep)
        if step % args.every == 0 or step == args.steps:
            # Periodic checkpoints upload in the background while training goes on; the last
            # one is committed before the run ends.
            emit(event="checkpoint", step=step, name=manager.save(engine, step, {"step": step}, wait=step == args.steps))

    weights = full_state_dict(engine, engine.module)
    if rank == 0 and args.weights_out:
        torch.save(weights, args.weights_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

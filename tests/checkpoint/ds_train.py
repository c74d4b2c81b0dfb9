"""A minimal DeepSpeed training loop driving CheckpointManager and save_trained, for the
kill/resume/preemption/export tests (run under torchrun). Independent of kubetune.train so
the checkpoint layer is tested on its own.

Data and dropout come from the global torch RNG (seeded per rank), so an exact resume needs
model, optimizer, scheduler *and* RNG restored. Rank 0 prints JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune import exitcodes
from kubetune.checkpoint import CheckpointManager, RetryPolicy, WorldSizeMismatch
from kubetune.export import full_state_dict, save_trained
from kubetune.layout import job_layout
from kubetune.spec import parse_job


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--local-dir", required=True, help="per-node staging; '{rank}' gives each rank its own 'node'")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--weights-out")
    p.add_argument("--export-dir")
    p.add_argument("--die-uploading", type=int, help="rank 1 SIGKILLs itself after its first upload of this step")
    return p.parse_args()


def build(args):
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * int(os.environ.get("WORLD_SIZE", "1")),
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2 if args.method == "lora" else 1e-3, "torch_adam": True, "weight_decay": 0.01}},
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
    if args.die_uploading is not None and rank == 1:
        put_file = manager.store.put_file

        def put_then_die(local, key):
            put_file(local, key)
            if key.startswith(f"step-{args.die_uploading:09d}/"):
                os.kill(os.getpid(), signal.SIGKILL)

        manager.store.put_file = put_then_die

    def emit(**event) -> None:
        if rank == 0:
            print(json.dumps(event), flush=True)

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))

    torch.manual_seed(args.seed * 1000 + rank)
    step = 0
    try:
        state = manager.resume(engine)
    except WorldSizeMismatch as err:
        print(str(err), file=sys.stderr, flush=True)
        return exitcodes.INVALID_INPUT
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
        flag = torch.tensor([1 if stop["flag"] else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            emit(event="checkpoint", step=step, name=manager.save(engine, step, {"step": step}))
            emit(event="preempted", step=step)
            return exitcodes.PREEMPTED
        if step % args.every == 0 or step == args.steps:
            emit(event="checkpoint", step=step, name=manager.save(engine, step, {"step": step}))

    weights = full_state_dict(engine, engine.module)
    if rank == 0 and args.weights_out:
        torch.save(weights, args.weights_out)
    if args.export_dir:
        job = parse_job(
            {
                "metadata": {"name": "export-test"},
                "spec": {
                    "model": {"uri": args.model},
                    "dataset": {"uri": "unused.jsonl"},
                    "method": {"type": args.method},
                    "output": {"uri": args.export_dir},
                },
            }
        )
        outputs = save_trained(engine, engine.module, AutoTokenizer.from_pretrained(args.model), job, job_layout(job), args.model)
        emit(event="done", step=step, outputs=outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

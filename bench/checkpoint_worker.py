"""One process of the checkpoint benchmark (world size 1, DeepSpeed ZeRO-2, the trainer's
default): train a few steps, then save and load the same engine state twice,

- KubeTune: `CheckpointManager.save(wait=False)` as the trainer calls it for periodic
  checkpoints: DeepSpeed writes its files to the local disk (training is blocked until then),
  then SHA-256, parallel uploads and the manifest commit run in a background thread while the
  worker keeps training (the step times during the upload are recorded). Measured: the time
  training was blocked, and the time from the start of the save until the manifest was
  committed (durable). Then `save(wait=True)` (as at preemption and at the end of training):
  save + commit with nothing else running. `load` into a fresh local folder (download,
  verify, restore);
- naive: `torch.save` of the model and optimizer state dicts and one sequential `put_object`
  per file; load with one `get_object` per file, `torch.load` and `load_state_dict`.

    python -m bench.checkpoint_worker --model DIR --uri s3://checkpoints/bench --out result.json

S3 credentials and endpoint come from the environment (AWS_*), as in a training pod.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

STEPS = 3
MAX_STEPS_DURING_UPLOAD = 100


def engine_for(model_dir: Path, micro_batch: int):
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 1}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
    return engine


def train_steps(engine, steps: int, micro_batch: int, length: int, vocab: int) -> list[float]:
    import torch

    times = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (micro_batch, length), generator=generator)
        started = time.monotonic()
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        times.append(time.monotonic() - started)
    return times


def naive_save(engine, client, bucket: str, prefix: str, scratch: Path) -> tuple[float, int]:
    import torch

    started = time.monotonic()
    scratch.mkdir(parents=True, exist_ok=True)
    files = {"model.pt": engine.module.state_dict(), "optimizer.pt": engine.optimizer.state_dict(), "scheduler.pt": engine.lr_scheduler.state_dict()}
    total = 0
    for name, state in files.items():
        torch.save(state, scratch / name)
    for name in files:
        body = (scratch / name).read_bytes()
        total += len(body)
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)
    return time.monotonic() - started, total


def naive_load(engine, client, bucket: str, prefix: str) -> float:
    import torch

    started = time.monotonic()
    states = {}
    for name in ("model.pt", "optimizer.pt", "scheduler.pt"):
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
        states[name] = torch.load(io.BytesIO(body), weights_only=False)
    engine.module.load_state_dict(states["model.pt"])
    engine.optimizer.load_state_dict([states["optimizer.pt"]])  # ZeRO takes one state dict per data-parallel rank
    engine.lr_scheduler.load_state_dict(states["scheduler.pt"])
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--uri", required=True, help="s3://BUCKET/PREFIX for both checkpoints")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        from kubetune.artifacts.net import free_port

        os.environ["MASTER_PORT"] = str(free_port())

    from kubetune.api.uri import parse_uri
    from kubetune.artifacts.checkpoint import CheckpointManager
    from kubetune.artifacts.storage import open_store, s3_client

    engine = engine_for(args.model, args.micro_batch)
    vocab = engine.module.config.vocab_size
    step_times = train_steps(engine, STEPS, args.micro_batch, args.length, vocab)

    kubetune_uri = parse_uri(args.uri).join("kubetune")
    manager = CheckpointManager(kubetune_uri, keep=2, local_dir=args.workdir / "local-save", rank=0, world_size=1)
    started = time.monotonic()
    name = manager.save(engine, STEPS, {"step": STEPS}, wait=False)
    kubetune_blocked = time.monotonic() - started
    # Training goes on while the checkpoint uploads (what the trainer does between checkpoints).
    during_upload: list[float] = []
    while manager.uploading and len(during_upload) < MAX_STEPS_DURING_UPLOAD:
        during_upload += train_steps(engine, 1, args.micro_batch, args.length, vocab)
    manager.wait()
    kubetune_commit = manager.commit_seconds
    kubetune_bytes = sum(o.size for o in open_store(kubetune_uri).list(name + "/"))
    # The same save waited for (as at preemption or the end of training): save + commit with
    # nothing else running, the conditions of the naive save.
    started = time.monotonic()
    manager.save(engine, STEPS + len(during_upload), {"step": STEPS + len(during_upload)}, wait=True)
    kubetune_sync = time.monotonic() - started

    naive_uri = parse_uri(args.uri).join("naive")
    client = s3_client()
    naive_save_s, naive_bytes = naive_save(engine, client, naive_uri.bucket, naive_uri.path.strip("/"), args.workdir / "naive")

    # Loads start from an empty local folder, as on a fresh node after a restart.
    fresh = CheckpointManager(kubetune_uri, keep=2, local_dir=args.workdir / "local-load", rank=0, world_size=1)
    started = time.monotonic()
    fresh.load(engine, name)
    kubetune_load = time.monotonic() - started
    naive_load_s = naive_load(engine, client, naive_uri.bucket, naive_uri.path.strip("/"))
    after = train_steps(engine, 1, args.micro_batch, args.length, vocab)

    args.out.write_text(
        json.dumps(
            {
                "step_seconds": sorted(step_times[1:] + after)[len(step_times[1:] + after) // 2],
                "step_seconds_all": step_times + after,
                "kubetune_sync_save_seconds": kubetune_sync,
                "kubetune_blocked_seconds": kubetune_blocked,
                "kubetune_commit_seconds": kubetune_commit,
                "step_seconds_during_upload": during_upload,
                "kubetune_bytes": kubetune_bytes,
                "naive_save_seconds": naive_save_s,
                "naive_bytes": naive_bytes,
                "kubetune_load_seconds": kubetune_load,
                "naive_load_seconds": naive_load_s,
                "params": sum(p.numel() for p in engine.module.parameters()),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Checkpoint cost against SeaweedFS (a real S3 server on 127.0.0.1).

1. Save and load of the same engine state (bench/checkpoint_worker.py): KubeTune's
   CheckpointManager against `torch.save` + one sequential PUT per file (and GET + torch.load).
   Equal work: both hold the model, optimizer and scheduler state (bytes compared).
   KubeTune saves as the trainer does between checkpoints: training is blocked only while
   DeepSpeed writes the local files; upload and manifest commit run in the background while
   training goes on. Figures, each against the naive save (which blocks training for all of
   its time and is durable when it returns):
   - `kubetune_blocked_seconds`, `blocked_ratio`: the time training waits for a periodic
     checkpoint (the figure the issue's goal is about: "the save that training waits for");
   - `kubetune_commit_seconds`, `commit_ratio`: from the start of that save until its
     manifest is committed (durable), while training goes on beside the upload;
   - `kubetune_save_seconds`, `ratio`: a save waited for until committed (`wait=True`, as at
     preemption and at the end of training), nothing else running: the same conditions as the
     naive save. `ratio` is this save + commit ratio, not the blocked-time ratio.
2. The share of training time spent checkpointing at the default interval
   (checkpoint.everySteps = 100): (blocked + slowdown of the steps that ran during the upload)
   / (100 x step + that). The slowdown is sum(step time during upload - median step time).
3. Resume with the real trainer: a run is preempted (SIGTERM after its first step: it
   commits a checkpoint and exits 75), the same job starts again; time from process start
   to the first new step, beside a fresh start of the same job.

    python -m bench.checkpoint_cost [--quick] [--workdir DIR]   # prints the JSON figures
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import (
    MEMORY_SHAPE,
    QUICK_SHAPE,
    BenchError,
    bench_env,
    build_bench_model,
    chat_records,
    equal_work,
    job_document,
    ratio,
    run_trainer,
    same,
    write_job,
    write_jsonl,
)

DEFAULT_EVERY_STEPS = 100  # spec.checkpoint.everySteps default


def settings(quick: bool) -> dict:
    if quick:
        return {"shape": QUICK_SHAPE, "micro_batch": 2, "length": 32, "samples": 16, "max_length": 64}
    return {"shape": MEMORY_SHAPE, "micro_batch": 4, "length": 256, "samples": 64, "max_length": 256}


def save_and_load(model_dir: Path, seaweed, cfg: dict, workdir: Path) -> dict:
    out = workdir / "worker.json"
    cmd = [sys.executable, "-m", "bench.checkpoint_worker", "--model", str(model_dir), "--uri", "s3://checkpoints/bench",
           "--micro-batch", str(cfg["micro_batch"]), "--length", str(cfg["length"]), "--workdir", str(workdir / "worker"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=bench_env(2, **seaweed.env), capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise BenchError(f"checkpoint worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def resume(model_dir: Path, seaweed, cfg: dict, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = write_jsonl(workdir / "chat.jsonl", chat_records(cfg["samples"], 16, cfg["max_length"], seed=5, tokenizer=tokenizer))
    training = {"maxSteps": 1000, "microBatchSize": cfg["micro_batch"], "maxLength": cfg["max_length"], "precision": "fp32", "logEverySteps": 1}

    def job(name: str) -> Path:
        doc = job_document(
            name, model_dir, data, training=training,
            distributed={"nodes": 1, "gpusPerNode": 1, "zero": {"stage": 2}},
            checkpoint={"uri": f"s3://checkpoints/{name}", "everySteps": DEFAULT_EVERY_STEPS, "keep": 1},
            storage={"endpoint": seaweed.endpoint},
            output={"uri": str(workdir / name / "output")},
        )  # fmt: skip
        return write_job(workdir / name / "job.yaml", doc)

    preempted = run_trainer(job("resume-job"), env=seaweed.env, stop_after_first_step=True)
    if preempted.returncode != 75:
        raise BenchError(f"the preempted run exited with {preempted.returncode}, expected 75 (PREEMPTED):\n{preempted.stderr_tail}")
    _, stopped = preempted.last("preempted")
    resumed = run_trainer(job("resume-job"), env=seaweed.env, stop_after_first_step=True)
    _, resume_event = resumed.first("resume")
    first_new_t, first_new = resumed.first("step")
    fresh = run_trainer(job("fresh-job"), env=seaweed.env, stop_after_first_step=True)
    fresh_t, fresh_first = fresh.first("step")
    work = equal_work(
        resumed_at_step=same(resume_event["step"], stopped["step"]),
        first_new_step=same(first_new["step"], stopped["step"] + 1),
    )
    return {
        "preempted_at_step": stopped["step"],
        "checkpoint_seconds_at_preemption": (preempted.of("checkpoint") or [(0, {})])[-1][1].get("seconds"),
        "resume_to_first_new_step_seconds": first_new_t,
        "fresh_start_to_first_step_seconds": fresh_t,
        "resume_overhead_seconds": first_new_t - fresh_t,
        "equal_work": work,
        "fresh_first_step": fresh_first["step"],
    }


def run(workdir: Path, quick: bool = False, skip_resume: bool = False) -> dict:
    from kubetune.artifacts.embedded_s3 import SeaweedS3

    cfg = settings(quick)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_bench_model(workdir / "model", cfg["shape"])
    with SeaweedS3(workdir / "seaweed", buckets=("checkpoints",)) as seaweed:
        io = save_and_load(model_dir, seaweed, cfg, workdir)
        restart = None if skip_resume else resume(model_dir, seaweed, cfg, workdir)
    work = equal_work(state_bytes=same(io["kubetune_bytes"], io["naive_bytes"], tolerance=0.15))
    naive = io["naive_save_seconds"]
    blocked, commit, sync = io["kubetune_blocked_seconds"], io["kubetune_commit_seconds"], io["kubetune_sync_save_seconds"]
    during = io["step_seconds_during_upload"]
    slowdown = max(0.0, sum(during) - len(during) * io["step_seconds"])
    interval = DEFAULT_EVERY_STEPS * io["step_seconds"]
    return {
        "params": io["params"],
        "step_seconds": io["step_seconds"],
        "kubetune_save_seconds": sync,
        "kubetune_commit_seconds": commit,
        "kubetune_blocked_seconds": blocked,
        "naive_save_seconds": naive,
        "steps_during_upload": len(during),
        "step_seconds_during_upload": during,
        "upload_slowdown_seconds": slowdown,
        "kubetune_load_seconds": io["kubetune_load_seconds"],
        "naive_load_seconds": io["naive_load_seconds"],
        "kubetune_bytes": io["kubetune_bytes"],
        "naive_bytes": io["naive_bytes"],
        "equal_work": work,
        "ratio": ratio(sync, naive, work, higher_is_better=False),
        "commit_ratio": ratio(commit, naive, work, higher_is_better=False),
        "blocked_ratio": ratio(blocked, naive, work, higher_is_better=False),
        "load_ratio": ratio(io["kubetune_load_seconds"], io["naive_load_seconds"], work, higher_is_better=False),
        "every_steps": DEFAULT_EVERY_STEPS,
        "share_of_step_time": (blocked + slowdown) / (interval + blocked + slowdown),
        "resume": restart,
    }


def main() -> None:
    import argparse
    import shutil
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model: checks that it runs (figures meaningless)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--skip-resume", action="store_true", help="only the save/load comparison (no trainer runs)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-ckpt-bench-"))
    try:
        print(json.dumps(run(workdir, quick=args.quick, skip_resume=args.skip_resume), indent=1))
    finally:
        if args.workdir is None:  # several GB of checkpoints
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

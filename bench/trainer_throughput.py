"""Trainer throughput: KubeTune's trainer against the tutorials' HF Trainer baseline.

Same model (a Llama config bigger than the test model, random weights), same mixed-length
chat data (skewed short, nothing truncated), same hyperparameters, one epoch, fp32, one
process with the same thread count. The baseline pads every sample to maxLength; KubeTune
runs with packing (headline) and without (dynamic padding, same optimizer steps as the
baseline). Figures: effective (non-padding) tokens per second of training time, where
training time is KubeTune's `start` event to its last `step` event and the baseline's
`trainer.train()`; final and mean training loss of both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from statistics import mean, median

from bench.common import (
    QUICK_SHAPE,
    THROUGHPUT_SHAPE,
    BenchError,
    bench_env,
    build_bench_model,
    chat_messages,
    chat_records,
    equal_work,
    job_document,
    ratio,
    run_trainer,
    same,
    tokenize_chat,
    write_job,
    write_jsonl,
)

THREADS = 2
SEED = 1234


def settings(quick: bool) -> dict:
    if quick:
        return {"shape": QUICK_SHAPE, "samples": 24, "max_length": 128, "micro_batch": 4}
    return {"shape": THROUGHPUT_SHAPE, "samples": 112, "max_length": 512, "micro_batch": 4}


def training_block(cfg: dict, packing: bool) -> dict:
    return {
        "epochs": 1,
        "learningRate": 1.0e-4,
        "lrScheduler": "cosine",
        "warmupRatio": 0.0,
        "weightDecay": 0.0,
        "maxGradNorm": 1.0,
        "microBatchSize": cfg["micro_batch"],
        "gradientAccumulationSteps": 1,
        "maxLength": cfg["max_length"],
        "packing": packing,
        "precision": "fp32",
        "seed": SEED,
        "logEverySteps": 1,
    }


def run_baseline(model_dir: Path, data: Path, training: dict, workdir: Path) -> dict:
    out = workdir / "hf-baseline.json"
    cmd = [sys.executable, "-m", "bench.hf_baseline", "--model", str(model_dir), "--data", str(data), "--training", json.dumps(training), "--out", str(out)]
    proc = subprocess.run(cmd, env=bench_env(THREADS), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise BenchError(f"HF Trainer baseline failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def trainer_tokens(summary: dict) -> int | None:
    """Non-padding tokens the trainer reports having trained on (its done-event summary)."""
    for key in ("tokens_seen", "tokens"):
        if isinstance(summary.get(key), (int, float)):
            return int(summary[key])
    return None


def run_kubetune(name: str, model_dir: Path, data: Path, training: dict, workdir: Path) -> dict:
    job = write_job(
        workdir / name / "job.yaml",
        job_document(name, model_dir, data, training=training, checkpoint={"everySteps": 100000, "keep": 1}),
    )
    result = run_trainer(job, nproc=1, threads=THREADS).check()
    start_t, start = result.first("start")
    steps = result.of("step")
    end_t, last = result.last("step")
    _, done = result.last("done")
    summary = done.get("summary") or {}
    losses = [e["loss"] for _, e in steps if e.get("loss") is not None]
    return {
        "steps": last["step"],
        "samples": start.get("train_samples"),
        "total_params": start.get("total_params"),
        "non_padding_tokens": trainer_tokens(summary),
        "train_seconds": end_t - start_t,
        "process_seconds": result.wall_seconds,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": mean(losses) if losses else None,
        "summary": summary,
    }


def compare(kubetune: dict, baseline: dict, expected_tokens: int, same_steps: bool) -> dict:
    """Tokens/s of both and their ratio, if both trained the same samples and tokens."""
    checks = {
        "samples": same(kubetune["samples"], baseline["samples"]),
        "model_params": same(kubetune["total_params"], baseline["total_params"]),
        "non_padding_tokens": same(kubetune["non_padding_tokens"], baseline["non_padding_tokens"]),
        "baseline_tokens_match_data": same(baseline["non_padding_tokens"], expected_tokens),
    }
    if same_steps:
        checks["steps"] = same(kubetune["steps"], baseline["steps"])
    work = equal_work(**checks)
    k_tps = kubetune["non_padding_tokens"] / kubetune["train_seconds"] if kubetune["non_padding_tokens"] else None
    b_tps = baseline["non_padding_tokens"] / baseline["train_seconds"]
    return {
        "kubetune_tokens_per_second": k_tps,
        "baseline_tokens_per_second": b_tps,
        "ratio": ratio(k_tps or 0.0, b_tps, work),
        "end_to_end_ratio": ratio(baseline["process_seconds"], kubetune["process_seconds"], work),
        "equal_work": work,
    }


def fill_whole_steps(records: list[dict], tokenizer, cfg: dict) -> list[dict]:
    """The longest prefix (a multiple of the micro batch) whose packed rows also fill whole
    steps, so that no run repeats samples to fill its last step and the tokens are equal.
    Packed rows are counted with KubeTune's own tokenizer and packing (same seed)."""
    from kubetune.data.batching import rows_from_samples
    from kubetune.data.tokenize import LengthLimits, tokenize_messages

    limits = LengthLimits(cfg["max_length"])
    samples = [tokenize_messages(tokenizer, chat_messages(r["prompt"], r["response"]), limits)[0] for r in records]
    mb = cfg["micro_batch"]
    for n in range(len(records) - len(records) % mb, 0, -mb):
        if len(rows_from_samples(samples[:n], cfg["max_length"], True, SEED)) % mb == 0:
            return records[:n]
    raise BenchError("no prefix of the generated data packs into whole steps")


def run(workdir: Path, quick: bool = False) -> dict:
    from transformers import AutoTokenizer

    cfg = settings(quick)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_bench_model(workdir / "model", cfg["shape"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = fill_whole_steps(chat_records(cfg["samples"], 16, cfg["max_length"], seed=7, tokenizer=tokenizer), tokenizer, cfg)
    data = write_jsonl(workdir / "chat.jsonl", records)
    lengths = [len(tokenize_chat(tokenizer, r)[0]) for r in records]

    baseline = run_baseline(model_dir, data, training_block(cfg, packing=False), workdir)
    from transformers import AutoConfig, AutoModelForCausalLM

    baseline["total_params"] = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters())
    packed = run_kubetune("packed", model_dir, data, training_block(cfg, packing=True), workdir)
    dynamic = run_kubetune("dynamic", model_dir, data, training_block(cfg, packing=False), workdir)

    headline = compare(packed, baseline, sum(lengths), same_steps=False)
    return {
        "model": {"shape": cfg["shape"], "params": baseline["total_params"]},
        "data": {
            "samples": len(records),
            "max_length": cfg["max_length"],
            "tokens": sum(lengths),
            "mean_length": mean(lengths),
            "median_length": median(lengths),
            "longest": max(lengths),
            "padding_share_of_baseline": 1 - sum(lengths) / (len(records) * cfg["max_length"]),
        },
        "threads": THREADS,
        "baseline": baseline,
        "kubetune_packed": packed,
        "kubetune_dynamic_padding": {**dynamic, **compare(dynamic, baseline, sum(lengths), same_steps=True)},
        **headline,
    }

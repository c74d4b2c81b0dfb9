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
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean, median
from typing import Optional

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
        return {"shape": QUICK_SHAPE, "samples": 24, "peer_samples": 24, "max_length": 128, "micro_batch": 4}
    return {"shape": THROUGHPUT_SHAPE, "samples": 112, "peer_samples": 224, "max_length": 512, "micro_batch": 4}


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


def pyspy(output: Optional[Path]) -> list[str]:
    """The command prefix that samples a Python process's stacks into `output` (none without one)."""
    if output is None:
        return []
    beside = Path(sys.executable).parent / "py-spy"  # the environment's own, also when its bin is not on PATH
    return [str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy", "record", "--format", "raw", "--rate", str(PROFILE_RATE), "--output", str(output), "--"]


PROFILE_RATE = 100  # samples per second
# Where training time goes: each sample inside the training loop counts for the innermost
# frame that matches one of these (file or function name fragments of py-spy's raw stacks).
PROFILE_PARTS = {
    "loss": ("loss_utils.py", "cross_entropy"),
    "attention": ("sdpa_attention", "scaled_dot_product", "eager_attention", "masking_utils.py"),
    "forward (rest)": ("forward (",),
    "backward": ("backward (torch/", "_engine_run_backward", "run_backward"),
    "optimizer": ("torch/optim/",),
    "gradient norm/clip": ("clip_grad", "grad_norm", "get_global_norm"),
    "batching/data": ("collat", "dataloader", "torch/utils/data", "batching.py"),
    "distributed sync": ("torch/distributed/", "all_reduce", "barrier"),
    "DeepSpeed engine": ("deepspeed/",),
    "accelerate/Trainer": ("accelerate/", "transformers/trainer"),
}
# The function that runs the optimizer steps (and nothing before or after them) on each side.
LOOP_FRAMES = {"kubetune": "train (kubetune/train/recipe.py", "peer": "_inner_training_loop (transformers/trainer.py"}


def profile_summary(raw: Path, loop_frame: str) -> dict:
    """Seconds and share of the sampled training-loop time in each PROFILE_PARTS part."""
    parts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or not any(loop_frame in f for f in frames):
            continue
        part = next((name for frame in reversed(frames) for name, keys in PROFILE_PARTS.items() if any(k in frame for k in keys)), "other")
        parts[part] = parts.get(part, 0) + int(count)
    total = sum(parts.values())
    return {"loop_seconds": total / PROFILE_RATE,
            "parts": {name: {"seconds": n / PROFILE_RATE, "share": n / total} for name, n in sorted(parts.items(), key=lambda kv: -kv[1])}}  # fmt: skip


def run_baseline(model_dir: Path, data: Path, training: dict, workdir: Path, peer: str = "padded", profile: Optional[Path] = None) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"hf-{peer}.json"
    cmd = pyspy(profile) + [sys.executable, "-m", "bench.hf_baseline", "--peer", peer, "--model", str(model_dir), "--data", str(data),
                            "--training", json.dumps(training), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=bench_env(THREADS), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise BenchError(f"peer {peer} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def trainer_tokens(summary: dict) -> int | None:
    """Non-padding tokens the trainer reports having trained on (its done-event summary)."""
    for key in ("tokens_seen", "tokens"):
        if isinstance(summary.get(key), (int, float)):
            return int(summary[key])
    return None


def run_kubetune(name: str, model_dir: Path, data: Path, training: dict, workdir: Path, profile: Optional[Path] = None) -> dict:
    job = write_job(
        workdir / name / "job.yaml",
        job_document(name, model_dir, data, training=training, checkpoint={"everySteps": 100000, "keep": 1}),
    )
    result = run_trainer(job, nproc=1, threads=THREADS, wrapper=pyspy(profile)).check()
    start_t, start = result.first("start")
    steps = result.of("step")
    end_t, last = result.last("step")
    _, done = result.last("done")
    summary = done.get("summary") or {}
    losses = [e["loss"] for _, e in steps if e.get("loss") is not None]
    return {
        "steps": last["step"],
        "rows": start.get("rows"),
        "samples": start.get("train_samples"),
        "total_params": start.get("total_params"),
        "non_padding_tokens": trainer_tokens(summary),
        "train_seconds": end_t - start_t,
        "process_seconds": result.wall_seconds,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": mean(losses) if losses else None,
        "losses": losses,
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
    if "answer_tokens" in kubetune and "answer_tokens" in baseline:  # the tokens the loss counts
        checks["answer_tokens"] = same(kubetune["answer_tokens"], baseline["answer_tokens"])
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


def kubetune_samples(records: list[dict], tokenizer, cfg: dict) -> list:
    from kubetune.data.tokenize import LengthLimits, tokenize_messages

    limits = LengthLimits(cfg["max_length"])
    return [tokenize_messages(tokenizer, chat_messages(r["prompt"], r["response"]), limits)[0] for r in records]


def peer_records(records: list[dict], tokenizer, cfg: dict) -> tuple[list[dict], int]:
    """(records, steps): the longest prefix whose packed rows fill whole steps and whose samples
    divide evenly over those steps, so that KubeTune and TRL (packed rows per step) and the
    flattening Trainer (samples per step) all run the same steps without repeating a sample."""
    from kubetune.data.batching import rows_from_samples

    samples = kubetune_samples(records, tokenizer, cfg)
    mb = cfg["micro_batch"]
    for n in range(len(records), 0, -1):
        rows = len(rows_from_samples(samples[:n], cfg["max_length"], True, SEED))
        if rows % mb == 0 and n % (rows // mb) == 0:
            return records[:n], rows // mb
    raise BenchError("no prefix of the generated data packs into whole steps of whole samples")


# The configurations a user picks today instead of padding to the maximum length.
PEERS = {"hf_trainer_flattening": "flattening", "trl_sft_bfd_packing": "trl_bfd"}
LOSS_TOLERANCE = 0.05  # relative: mean and final training loss of KubeTune and the peer


def loss_check(kubetune: dict, peer: dict) -> dict:
    """Both runs trained as well: mean and final training loss within LOSS_TOLERANCE."""
    checks = {key: same(kubetune[key], peer[key], tolerance=LOSS_TOLERANCE) for key in ("mean_loss", "final_loss")}
    return {"equal": all(c["equal"] for c in checks.values()), **checks}


def run_peer(workdir: Path, quick: bool = False, profile: bool = False) -> dict:
    """`trainer_vs_peer`: KubeTune with packing against the best padding-free peer, same data,
    model, steps, effective batch (4 packed rows per step; the flattening Trainer takes the same
    samples per step on average) and answer-only loss. ratio = KubeTune effective tokens/s over
    the fastest peer's that did equal work. With `profile`, every side runs once more under
    py-spy and its training loop's time is split into PROFILE_PARTS (forward, attention,
    backward, optimizer, ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = settings(quick)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_bench_model(workdir / "model", cfg["shape"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records, steps = peer_records(chat_records(cfg["peer_samples"], 16, cfg["max_length"], seed=7, tokenizer=tokenizer), tokenizer, cfg)
    data = write_jsonl(workdir / "chat.jsonl", records)
    lengths = [len(tokenize_chat(tokenizer, r)[0]) for r in records]
    params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters())

    packed_training = training_block(cfg, packing=True)
    kubetune = run_kubetune("packed", model_dir, data, packed_training, workdir)
    kubetune["answer_tokens"] = sum(s.trained_tokens for s in kubetune_samples(records, tokenizer, cfg))
    peers, peer_training = {}, {}
    for name, peer in PEERS.items():
        # TRL packs rows as KubeTune does (microBatchSize rows per step); the flattening Trainer
        # takes samples: as many per step as KubeTune's packed steps hold on average.
        training = peer_training[name] = packed_training if peer == "trl_bfd" else {**training_block(cfg, packing=False), "microBatchSize": len(records) // steps}
        try:
            result = run_baseline(model_dir, data, training, workdir, peer)
        except BenchError as err:
            peers[name] = {"error": str(err)[-2000:]}
            continue
        result["total_params"] = params
        peers[name] = {**result, **compare(kubetune, result, sum(lengths), same_steps=True), "loss": loss_check(kubetune, result)}
    if profile:  # again under py-spy (its sampling slows a run a little): where the time goes
        run_kubetune("profiled", model_dir, data, packed_training, workdir, profile=workdir / "kubetune.pyspy")
        kubetune["profile"] = profile_summary(workdir / "kubetune.pyspy", LOOP_FRAMES["kubetune"])
        for name in peer_training:
            if "error" not in peers[name]:
                run_baseline(model_dir, data, peer_training[name], workdir / "profiled", PEERS[name], profile=workdir / f"{name}.pyspy")
                peers[name]["profile"] = profile_summary(workdir / f"{name}.pyspy", LOOP_FRAMES["peer"])
    equal = {n: p for n, p in peers.items() if p.get("ratio") is not None}
    best = max(equal, key=lambda n: equal[n]["baseline_tokens_per_second"]) if equal else None
    headline = peers[best] if best else {}
    return {
        "model": {"shape": cfg["shape"], "params": params},
        "data": {"samples": len(records), "max_length": cfg["max_length"], "tokens": sum(lengths), "answer_tokens": kubetune["answer_tokens"],
                 "mean_length": mean(lengths), "median_length": median(lengths), "longest": max(lengths)},  # fmt: skip
        "threads": THREADS,
        "steps": steps,
        "effective_batch": {"kubetune": f"{cfg['micro_batch']} packed rows of <= {cfg['max_length']} tokens per step",
                            "trl_sft_bfd_packing": f"{cfg['micro_batch']} packed rows of <= {cfg['max_length']} tokens per step, flattened",
                            "hf_trainer_flattening": f"{len(records) // steps} samples per step, flattened"},  # fmt: skip
        "kubetune": kubetune,
        "peers": peers,
        "best_peer": best,
        "kubetune_tokens_per_second": headline.get("kubetune_tokens_per_second"),
        "baseline_tokens_per_second": headline.get("baseline_tokens_per_second"),
        "ratio": headline.get("ratio"),
        "loss_equal": headline.get("loss", {}).get("equal"),
        "equal_work": headline.get("equal_work", equal_work(peer=same(None, "a peer that did equal work"))),
    }


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

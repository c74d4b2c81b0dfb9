"""ZeRO memory: peak memory per rank of KubeTune's trainer with DDP (ZeRO stage 0), ZeRO-2,
ZeRO-3 and ZeRO-3 with offload, 2 ranks under torchrun on CPU, beside the memory planner's
estimate for the same job.

The model (~155M parameters, full fine-tuning, fp32 Adam: 16 bytes per parameter of model
states under DDP, ~2.3 GiB per rank) is large enough that model states, not the framework,
dominate a rank. Measured per rank (bench/rank_peak.py):
- the exact peak RSS over the process's life (getrusage; includes the final export, where
  ZeRO-3 gathers the whole model on rank 0 to write it),
- the process baseline: the RSS when the trainer starts loading the model (Python, torch,
  transformers, DeepSpeed, the process group, data and tokenizer; no weight yet),
- the exact peak RSS up to the export (loading, DeepSpeed, every step, the checkpoint),
- the training memory: that peak minus the baseline (model, gradients, optimizer states,
  DeepSpeed buffers, activations), which is what ZeRO partitions,
- the sampled peak RSS during the steps (`start` event to the last `step` event).
`zero3_over_ddp` (the goal's figure) is ZeRO-3's training memory over DDP's, each the highest
rank's; `zero3_over_ddp_total_rss` is the ratio of whole-life peaks (export included) and
`training_zero3_over_ddp` that of the sampled step-phase peaks above the baseline. On CPU a rank's
"device" and host memory are the same RSS, so the planner's per-rank figure is its per-GPU
estimate without the CUDA context, plus one host process and that rank's offloaded states.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import (
    QUICK_SHAPE,
    ZERO_MEMORY_SHAPE,
    BenchError,
    bench_env,
    build_bench_model,
    chat_records,
    equal_work,
    job_document,
    model_config,
    ratio,
    run_trainer,
    same,
    write_job,
    write_jsonl,
)
from bench.trainer_throughput import trainer_tokens

RANKS = 2
CONFIGS = {
    "ddp": {"stage": 0, "offload": "none"},
    "zero2": {"stage": 2, "offload": "none"},
    "zero3": {"stage": 3, "offload": "none"},
    "zero3_offload": {"stage": 3, "offload": "all"},
}


def settings(quick: bool) -> dict:
    if quick:
        return {"shape": QUICK_SHAPE, "samples": 8, "max_length": 32, "steps": 2}
    return {"shape": ZERO_MEMORY_SHAPE, "samples": 16, "max_length": 64, "steps": 3}


def training_block(cfg: dict) -> dict:
    return {
        "maxSteps": cfg["steps"],
        "microBatchSize": 1,
        "gradientAccumulationSteps": 1,
        "maxLength": cfg["max_length"],
        "precision": "fp32",
        "learningRate": 1.0e-5,
        "seed": 1234,
        "logEverySteps": 1,
    }


def planner_per_rank(job_doc: dict, config: dict) -> dict:
    """The planner's estimate, and what it means for one CPU rank (see the module docstring)."""
    from kubetune.api.spec import parse_job
    from kubetune.planner import estimate as planner

    est = planner.estimate(parse_job(job_doc), config)
    procs = job_doc["spec"]["distributed"]["gpusPerNode"]
    offloaded = (est.host_breakdown["offloaded_weights"] + est.host_breakdown["offloaded_optimizer"]) // procs
    device = est.per_gpu_bytes - planner.RUNTIME_CONTEXT_BYTES
    return {
        "per_gpu_bytes": est.per_gpu_bytes,
        "host_bytes_per_node": est.host_bytes,
        "breakdown": est.breakdown,
        "cpu_rank_bytes": device + planner.HOST_PROCESS_BYTES + offloaded,  # a CPU rank: no CUDA_HOST_BYTES
    }


def measure(name: str, zero: dict, model_dir: Path, data: Path, cfg: dict, workdir: Path) -> dict:
    doc = job_document(
        f"zero-{name.replace('_', '-')}",
        model_dir,
        data,
        training=training_block(cfg),
        distributed={"nodes": 1, "gpusPerNode": RANKS, "zero": zero},
        checkpoint={"everySteps": 100000, "keep": 1},
    )
    job = write_job(workdir / name / "job.yaml", doc)
    result = run_trainer(job, nproc=RANKS, threads=1).check()
    start_t, start = result.first("start")
    end_t, last = result.last("step")
    _, done = result.last("done")
    peaks = {rank: p["max_rss_bytes"] for rank, p in sorted(result.rank_peaks.items())}
    baselines = {rank: p.get("baseline_rss_bytes") for rank, p in sorted(result.rank_peaks.items())}
    pre_export = {rank: p.get("pre_export_peak_rss_bytes") for rank, p in sorted(result.rank_peaks.items())}
    if not peaks or None in baselines.values() or None in pre_export.values():
        raise BenchError(f"a rank recorded no peak, baseline or pre-export memory: {result.rank_peaks}")
    above = {rank: pre_export[rank] - baselines[rank] for rank in peaks}
    training = result.peak_rss_between(start_t, end_t)
    training_above = {rank: rss - baselines[rank] for rank, rss in sorted(training.items()) if rank in baselines}
    return {
        "zero": zero,
        "steps": last["step"],
        "total_params": start.get("total_params"),
        "tokens": trainer_tokens(done.get("summary") or {}),
        "peak_rss_bytes_per_rank": peaks,
        "peak_rss_bytes": max(peaks.values()) if peaks else None,
        "baseline_rss_bytes_per_rank": baselines,
        "pre_export_peak_rss_bytes_per_rank": pre_export,
        "loaded_rss_bytes_per_rank": {rank: p.get("loaded_rss_bytes") for rank, p in sorted(result.rank_peaks.items())},
        "above_baseline_bytes_per_rank": above,
        "above_baseline_bytes": max(above.values()),
        "training_above_baseline_bytes": max(training_above.values()) if training_above else None,
        "training_peak_rss_bytes_per_rank": dict(sorted(training.items())),
        "training_peak_rss_bytes": max(training.values()) if training else None,
        "planner": planner_per_rank(doc, model_config(model_dir)),
        "seconds": result.wall_seconds,
    }


def prebuild_cpu_adam() -> None:
    """Compile DeepSpeed's CPU Adam (offload) once, alone, before any measured run: two ranks
    compiling it at the same time race, and the compile is no part of the memory figures."""
    code = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
    proc = subprocess.run([sys.executable, "-c", code], env=bench_env(2), capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise BenchError(f"building DeepSpeed's cpu_adam op failed:\n{proc.stderr[-3000:]}")


def run(workdir: Path, quick: bool = False) -> dict:
    from transformers import AutoTokenizer

    cfg = settings(quick)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_bench_model(workdir / "model", cfg["shape"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = write_jsonl(workdir / "chat.jsonl", chat_records(cfg["samples"], 16, cfg["max_length"], seed=3, tokenizer=tokenizer))
    prebuild_cpu_adam()
    runs = {}
    for name, zero in CONFIGS.items():
        try:
            runs[name] = measure(name, zero, model_dir, data, cfg, workdir)
        except BenchError as err:  # keep the other configurations' figures
            runs[name] = {"zero": zero, "error": str(err)[-3000:]}

    ok = {name: r for name, r in runs.items() if "error" not in r}
    ddp = ok.get("ddp", {})
    checks = {"all_configurations_ran": same(sorted(ok), sorted(CONFIGS))}
    for name, r in ok.items():
        if name != "ddp" and ddp:
            checks[f"{name}_steps"] = same(r["steps"], ddp["steps"])
            checks[f"{name}_tokens"] = same(r["tokens"], ddp["tokens"])
            checks[f"{name}_params"] = same(r["total_params"], ddp["total_params"])
    work = equal_work(**checks)
    zero3 = ok.get("zero3", {})
    both = bool(ddp) and bool(zero3)

    def over_ddp(key: str):
        return zero3[key] / ddp[key] if both and zero3.get(key) and ddp.get(key) else None

    figure = "above_baseline_bytes"  # training memory: peak RSS up to the export minus the RSS before the model existed
    baselines = [b for r in ok.values() for b in r["baseline_rss_bytes_per_rank"].values()]
    return {
        "ranks": RANKS,
        "model": {"shape": cfg["shape"], "params": ddp.get("total_params")},
        "runs": runs,
        "equal_work": work,
        "ratio_figure": "exact peak RSS per rank up to the final export minus that rank's RSS when model loading started (highest rank), same for DDP and ZeRO-3",
        "process_baseline_rss_bytes": {"min": min(baselines), "max": max(baselines)} if baselines else None,
        # ZeRO-3 against plain data parallel, per rank: >1 means ZeRO-3 needs less.
        "ratio": ratio(zero3[figure], ddp[figure], work, higher_is_better=False) if both else None,
        "zero3_over_ddp": over_ddp(figure),
        "training_zero3_over_ddp": over_ddp("training_above_baseline_bytes"),
        "zero3_over_ddp_total_rss": over_ddp("peak_rss_bytes"),
    }


if __name__ == "__main__":
    # `python -m bench.zero_memory [--quick] [--out DIR] [--workdir DIR]`: this benchmark alone,
    # through run_cpu (its table, goal and cpu.json in --out, by default bench/results).
    from bench.run_cpu import main

    sys.exit(main(["--only", "zero_memory", *sys.argv[1:]]))

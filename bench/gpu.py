"""GPU benchmarks for a machine with NVIDIA GPUs (e.g. H100): KubeTune's trainer on
Llama-architecture models built from a config (random weights, no download), 1B and 7B
shapes, LoRA and full fine-tuning, ZeRO-2 and ZeRO-3, bf16, with and without packing.

    python -m bench.gpu                 # runs every config that the planner says fits; writes bench/results/gpu.json
    python -m bench.gpu --dry-run       # on any machine: builds every job, DeepSpeed config and planner
                                        # estimate, checks the FLOP and parameter counts; no GPU needed
    python -m bench.gpu --only 1b --steps 30 --peak-tflops 989

Per config: steady-state tokens/s (median of the per-step figures after warm-up steps), MFU
against the GPU's dense bf16 peak (detected from its name, or --peak-tflops), peak GPU
memory per rank (torch.cuda.max_memory_allocated / reserved, recorded in each rank by
bench/rank_peak.py) beside the planner's per-GPU estimate. A config the planner says does
not fit is tried with gradient checkpointing, then with ZeRO-3 offload, and is otherwise
recorded as skipped with the planner's figure.

MFU counts model FLOPs only (no recomputation): per trained token, 6 x N (full) or 4 x N
(LoRA: no weight gradients for the frozen base) for the N parameters that take part in
matrix products (all but the input embedding table), plus causal attention,
6 x layers x hidden x l for a token in a sample of l tokens (l token-weighted over the data).

Importing this module needs neither torch nor CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Optional

from bench.common import REPO, RESULTS_DIR, chat_records, job_document, machine, rounded, run_trainer, write_job, write_jsonl

# Llama 3.2 1B and Llama 2 7B shapes.
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=500000.0),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
}  # fmt: skip
METHODS = ("lora", "full")
ZERO_STAGES = (2, 3)
PACKING = (True, False)
MAX_LENGTH = 2048
SAMPLES = 2048
WARMUP_STEPS = 3

# Dense (no sparsity) bf16 tensor-core peaks, TFLOPS, by name fragment; first match wins.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 756.0),
    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A40", 150.0),
    ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0),
]  # fmt: skip


def peak_tflops(gpu_name: str) -> Optional[float]:
    for fragment, value in PEAK_BF16_TFLOPS:
        if fragment.lower() in gpu_name.lower():
            return value
    return None


@dataclass(frozen=True)
class Config:
    shape: str
    method: str
    zero: int
    packing: bool

    @property
    def name(self) -> str:
        return f"{self.shape}-{self.method}-zero{self.zero}-{'packed' if self.packing else 'padded'}"


def all_configs(only: Optional[str] = None) -> list[Config]:
    configs = [Config(s, m, z, p) for s in SHAPES for m in METHODS for z in ZERO_STAGES for p in PACKING]
    return [c for c in configs if not only or any(part in c.name for part in only.split(","))]


def model_config(shape: str, vocab_ids: int) -> dict[str, Any]:
    """A plain config.json dict for the shape (the tiny tokenizer's ids all fit in its vocabulary)."""
    from transformers import LlamaConfig

    params = dict(SHAPES[shape])
    if params["vocab_size"] < vocab_ids:
        raise ValueError(f"vocabulary {params['vocab_size']} is smaller than the tokenizer's {vocab_ids} ids")
    return LlamaConfig(**params, torch_dtype="bfloat16").to_dict()


def matmul_parameters(config: dict[str, Any]) -> int:
    """Parameters used in matrix products per token: every layer plus the output projection."""
    h, i, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    return config["num_hidden_layers"] * (attention + 3 * h * i) + h * config["vocab_size"]


def flops_per_token(config: dict[str, Any], method: str, token_weighted_length: float) -> float:
    n = matmul_parameters(config)
    dense = (6 if method == "full" else 4) * n
    attention = 6 * config["num_hidden_layers"] * config["hidden_size"] * token_weighted_length
    return dense + attention


def job_for(config: Config, model_dir: Path, data: Path, gpus: int, steps: int, checkpointing: bool, offload: str) -> dict:
    method = {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}} if config.method == "lora" else {"type": "full"}
    return job_document(
        config.name, model_dir, data,
        method=method,
        training={"maxSteps": steps, "microBatchSize": 1 if config.packing else 4, "gradientAccumulationSteps": 1, "maxLength": MAX_LENGTH,
                  "packing": config.packing, "precision": "bf16", "gradientCheckpointing": checkpointing, "learningRate": 1.0e-5,
                  "logEverySteps": 1, "seed": 1234},
        distributed={"nodes": 1, "gpusPerNode": gpus, "zero": {"stage": config.zero, "offload": offload}},
        checkpoint={"everySteps": 100000, "keep": 1},
    )  # fmt: skip


def plan(config: Config, model_cfg: dict, model_dir: Path, data: Path, gpus: int, steps: int, gpu_bytes: Optional[int]) -> tuple[Optional[dict], dict]:
    """The first variant (as is, + gradient checkpointing, + ZeRO-3 offload) the planner says fits."""
    from kubetune.api.spec import parse_job
    from kubetune.planner import estimate as planner

    variants = [(False, "none"), (True, "none")]
    if config.zero == 3:
        variants.append((True, "all"))
    last = {}
    for checkpointing, offload in variants:
        doc = job_for(config, model_dir, data, gpus, steps, checkpointing, offload)
        est = planner.estimate(parse_job(doc), model_cfg, gpu_bytes)
        last = {"per_gpu_bytes": est.per_gpu_bytes, "host_bytes": est.host_bytes, "total_params": est.total_params,
                "trainable_params": est.trainable_params, "gradient_checkpointing": checkpointing, "offload": offload, "fits": est.fits}  # fmt: skip
        if est.fits is not False:
            return doc, last
    return None, last


def deepspeed_config_for(doc: dict, gpus: int) -> dict:
    from kubetune.api.spec import parse_job
    from kubetune.train.deepspeed_config import build_deepspeed_config

    return build_deepspeed_config(parse_job(doc).spec, gpus, "bf16", on_gpu=True)


def build_model(dest: Path, shape: str) -> Path:
    """Random bf16 weights for the shape, initialised on the GPU, plus the tiny ChatML tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from kubetune.testing import build_tiny_tokenizer

    if (dest / "config.json").exists():
        return dest
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(**model_config(shape, len(tokenizer)))
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(dest)
    del model
    torch.cuda.empty_cache()
    return dest


def dataset(workdir: Path) -> tuple[Path, float]:
    """The mixed-length chat data and its token-weighted mean sample length."""
    from bench.common import tokenize_chat
    from kubetune.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    records = chat_records(SAMPLES, 16, MAX_LENGTH, seed=11, tokenizer=tokenizer)
    lengths = [len(tokenize_chat(tokenizer, r)[0]) for r in records]
    return write_jsonl(workdir / "chat.jsonl", records), sum(l * l for l in lengths) / sum(lengths)


def measure(config: Config, doc: dict, estimate: dict, model_cfg: dict, token_length: float, gpus: int, peak: Optional[float], workdir: Path) -> dict:
    job = write_job(workdir / config.name / "job.yaml", doc)
    result = run_trainer(job, nproc=gpus, threads=4, timeout=1800)
    out: dict[str, Any] = {"planner": estimate, "exit_code": result.returncode}
    if result.returncode != 0:
        out["error"] = result.stderr_tail[-2000:]
        return out
    steps = [e for _, e in result.of("step")]
    steady = [e["tokens_per_second"] for e in steps[WARMUP_STEPS:] if e.get("tokens_per_second")] or [e["tokens_per_second"] for e in steps if e.get("tokens_per_second")]
    tokens_per_second = median(steady) if steady else None
    achieved = tokens_per_second * flops_per_token(model_cfg, config.method, token_length) if tokens_per_second else None
    peaks = result.rank_peaks
    allocated = max((p.get("cuda_max_allocated_bytes", 0) for p in peaks.values()), default=None)
    reserved = max((p.get("cuda_max_reserved_bytes", 0) for p in peaks.values()), default=None)
    out.update(
        steps=len(steps),
        tokens_per_second=tokens_per_second,
        tokens_per_second_per_gpu=tokens_per_second / gpus if tokens_per_second else None,
        model_tflops_per_gpu=achieved / gpus / 1e12 if achieved else None,
        mfu=achieved / gpus / (peak * 1e12) if achieved and peak else None,
        peak_gpu_allocated_bytes=allocated,
        peak_gpu_reserved_bytes=reserved,
        planner_over_measured=estimate["per_gpu_bytes"] / reserved if reserved else None,
        final_loss=steps[-1].get("loss") if steps else None,
    )
    return out


def gpu_description() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"gpus": 0}
    props = torch.cuda.get_device_properties(0)
    return {"gpus": torch.cuda.device_count(), "gpu_name": props.name, "gpu_memory_bytes": props.total_memory}


def dry_run(configs: list[Config], workdir: Path, gpus: int, steps: int, gpu_bytes: int) -> dict:
    """Every job, DeepSpeed config, planner estimate and FLOP count, checked without a GPU."""
    from kubetune.planner import estimate as planner
    from kubetune.testing import build_tiny_tokenizer

    vocab_ids = len(build_tiny_tokenizer())
    data = write_jsonl(workdir / "chat.jsonl", [{"prompt": "q", "response": "a"}])
    out = {}
    for config in configs:
        model_cfg = model_config(config.shape, vocab_ids)
        doc, estimate = plan(config, model_cfg, workdir / "model", data, gpus, steps, gpu_bytes)
        shape_params = planner.estimate(parse_doc(job_for(config, workdir / "model", data, gpus, steps, False, "none")), model_cfg).total_params
        if shape_params != _transformers_params(model_cfg):
            raise ValueError(f"{config.name}: planner counts {shape_params} parameters, transformers {_transformers_params(model_cfg)}")
        entry: dict[str, Any] = {"planner": estimate, "flops_per_token_at_512": flops_per_token(model_cfg, config.method, 512.0)}
        if doc is None:
            entry["skipped"] = "planner: does not fit even with gradient checkpointing and offload"
        else:
            ds = deepspeed_config_for(doc, gpus)
            assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == config.zero, ds
            entry["deepspeed_zero"] = ds["zero_optimization"]
        out[config.name] = entry
    return out


def parse_doc(doc: dict):
    from kubetune.api.spec import parse_job

    return parse_job(doc)


def _transformers_params(model_cfg: dict) -> int:
    """Parameter count from transformers itself, on the meta device (no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**model_cfg))
    return sum(p.numel() for p in model.parameters())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="validate every config on CPU; run nothing")
    parser.add_argument("--only", help="comma-separated name fragments, e.g. 1b or 7b-lora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpus", type=int, help="processes (default: every visible GPU; 8 for --dry-run)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU when the name is not known")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench-gpu", help="models, data and runs (large: 7B weights)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu.json")
    args = parser.parse_args(argv)
    configs = all_configs(args.only)
    args.workdir.mkdir(parents=True, exist_ok=True)

    if args.dry_run:
        result = dry_run(configs, args.workdir, args.gpus or 8, args.steps, 80 * 1024**3)
        print(json.dumps(rounded(result), indent=2))
        return 0

    gpu = gpu_description()
    if not gpu["gpus"]:
        sys.exit("no CUDA GPU visible; use --dry-run to check the configs on this machine")
    gpus = args.gpus or gpu["gpus"]
    peak = args.peak_tflops or peak_tflops(gpu["gpu_name"])
    data, token_length = dataset(args.workdir)
    results: dict[str, Any] = {"machine": {**machine(), **gpu, "peak_bf16_tflops": peak, "processes": gpus}, "token_weighted_length": token_length, "runs": {}}
    for config in configs:
        model_dir = build_model(args.workdir / f"model-{config.shape}", config.shape)
        model_cfg = json.loads((model_dir / "config.json").read_text())
        doc, estimate = plan(config, model_cfg, model_dir, data, gpus, args.steps, gpu["gpu_memory_bytes"])
        if doc is None:
            results["runs"][config.name] = {"skipped": "planner: does not fit", "planner": estimate}
        else:
            print(f"[gpu] {config.name} ...", file=sys.stderr, flush=True)
            results["runs"][config.name] = measure(config, doc, estimate, model_cfg, token_length, gpus, peak, args.workdir)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rounded(results), indent=2) + "\n")  # after every run: partial results survive
    print(json.dumps(rounded(results["runs"]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One rank of test_zero3_memory: load a model the way the trainer does under ZeRO-3 and
write what this rank held to OUT/rank-<RANK>.json.

    torchrun --nproc_per_node 2 zero3_load_worker.py WARMUP_MODEL MODEL OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    warmup_dir, model_dir, out = (Path(a) for a in sys.argv[1:4])
    from kubetune.train.main import return_freed_host_memory

    return_freed_host_memory()  # as kubetune-train does for ZeRO-3 jobs
    import deepspeed
    import torch
    from safetensors import safe_open
    from transformers.integrations import HfDeepSpeedConfig

    from kubetune.api.spec import FineTuneJobSpec
    from kubetune.model.loader import load_model
    from kubetune.planner.zero_sizes import model_hidden_size
    from kubetune.train.deepspeed_config import build_deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    spec = FineTuneJobSpec.model_validate({"model": {"uri": str(model_dir)}, "dataset": {"uri": "d"}, "distributed": {"zero": {"stage": 3}}})
    config = json.loads((model_dir / "config.json").read_text())
    ds_config = build_deepspeed_config(spec, 2, "fp32", on_gpu=False, hidden_size=model_hidden_size(config))
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive while loading, as in train.loop

    load_model(warmup_dir, spec, "fp32")  # imports and first-use costs, outside the measured load
    torch.distributed.barrier()
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS (VmHWM)
    model = load_model(model_dir, spec, "fp32")
    peak = rss_kib("VmHWM")

    params = list(model.parameters())
    record = {
        "rank": rank,
        "params": len(params),
        "total_numel": sum(p.ds_numel for p in params),
        "held_numel": sum(p.ds_tensor.numel() for p in params),
        "gathered_after_load": [n for n, p in model.named_parameters() if p.numel() != 0],
        "largest_param_numel": max(p.ds_numel for p in params),
        "load_peak_increase_bytes": (peak - before) * 1024,
        "weights_match_checkpoint": None,
    }
    # Every weight must be the checkpoint's: gather one parameter at a time and compare.
    match = True
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                match = match and torch.equal(p.detach(), f.get_tensor(name))
    record["weights_match_checkpoint"] = match
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()

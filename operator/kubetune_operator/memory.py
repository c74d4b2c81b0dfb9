"""Will the job fit? The memory planner's estimate against what the pods will get.

Pure. GPU memory comes from the node selector (GPU feature discovery's `nvidia.com/gpu.memory`
label in MiB, or a size in the `nvidia.com/gpu.product` name such as NVIDIA-H100-80GB-HBM3);
host memory from spec.resources (limits, else requests). Unknown sizes are not checked.
The result is advisory: a MemoryFits condition and a Warning event, never a refusal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from kubetune.api.spec import FineTuneJob
from kubetune.planner.estimate import PlanError, estimate, parse_memory

GIB = 1024**3


@dataclass(frozen=True)
class MemoryCheck:
    fits: bool
    message: str


def gpu_memory_bytes(node_selector: dict[str, str]) -> Optional[int]:
    if "nvidia.com/gpu.memory" in node_selector:
        try:
            return int(node_selector["nvidia.com/gpu.memory"]) * 1024**2
        except ValueError:
            return None
    match = re.search(r"(\d+)\s*G[Bi]?\b", node_selector.get("nvidia.com/gpu.product", ""), re.IGNORECASE)
    return int(match.group(1)) * 1000**3 if match else None


def host_memory_bytes(job: FineTuneJob) -> Optional[int]:
    value = job.spec.resources.limits.get("memory") or job.spec.resources.requests.get("memory")
    try:
        return parse_memory(value) if value is not None else None
    except ValueError:
        return None


def check_memory(job: FineTuneJob, model_config: dict[str, Any]) -> Optional[MemoryCheck]:
    """None when nothing can be compared (no sizes known, or the config is not understood)."""
    gpu = gpu_memory_bytes(job.spec.node_selector)
    host = host_memory_bytes(job)
    try:
        plan = estimate(job, model_config, gpu)
    except (PlanError, KeyError, ValueError, TypeError):
        return None
    parts, short = [], []
    if gpu is not None:
        parts.append(f"~{plan.per_gpu_bytes / GIB:.1f} GiB per GPU of {gpu / GIB:.1f} GiB")
        if plan.per_gpu_bytes > gpu:
            short.append("GPU")
    if host is not None:
        parts.append(f"~{plan.host_bytes / GIB:.1f} GiB host memory per node of {host / GIB:.1f} GiB (spec.resources)")
        if plan.host_bytes > host:
            short.append("host")
    if not parts:
        return None
    message = "estimated " + ", ".join(parts)
    if short:
        return MemoryCheck(False, f"{message}: not enough {' and '.join(short)} memory (see `kubetune plan`)")
    return MemoryCheck(True, message)

"""The advisory memory check: planner estimate vs the GPU and host memory the pods get."""

from __future__ import annotations

from datetime import datetime

from operator_helpers import example

from kubetune.api.crd import FineTuneJobStatus
from kubetune.planner.estimate import shipped_config
from kubetune_operator.memory import check_memory, gpu_memory_bytes
from kubetune_operator.status import Observed, decide

NOW = datetime(2026, 11, 22, 12, 0, 0)


def test_gpu_memory_from_node_labels():
    assert gpu_memory_bytes({"nvidia.com/gpu.memory": "81559"}) == 81559 * 1024**2
    assert gpu_memory_bytes({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}) == 80 * 1000**3
    assert gpu_memory_bytes({"nvidia.com/gpu.product": "Tesla-T4"}) is None
    assert gpu_memory_bytes({}) is None


def test_full_fine_tuning_of_a_7b_model_does_not_fit_small_gpus():
    job = example("full-zero3-offload.yaml")
    config = shipped_config("llama-2-7b")
    assert check_memory(job, config).fits is True  # ZeRO-3 + offload on 4x8 H100
    job.spec.distributed.zero.stage, job.spec.distributed.zero.offload = 0, "none"
    job.spec.node_selector = {"nvidia.com/gpu.product": "NVIDIA-A10-24GB"}
    check = check_memory(job, config)
    assert check.fits is False and "GPU" in check.message and "of 22.4 GiB" in check.message


def test_host_memory_limit_is_checked_and_unknown_sizes_are_not():
    job = example("lora-multinode.yaml")
    config = shipped_config("smollm2-135m")
    assert check_memory(job, config).fits is True
    job.spec.resources.requests["memory"] = "512Mi"
    assert check_memory(job, config).fits is False
    job.spec.resources.requests.pop("memory")
    assert check_memory(job, config) is None


def test_memory_condition_and_a_single_warning_event():
    job = example("lora-multinode.yaml")
    short = (False, "estimated ~7.0 GiB host memory per node of 0.5 GiB: not enough host memory")
    d = decide(job, Observed(memory=short), None, FineTuneJobStatus(), NOW)
    cond = next(c for c in d.status.document()["conditions"] if c["type"] == "MemoryFits")
    assert (cond["status"], cond["reason"]) == ("False", "PlanExceedsMemory")
    assert "MemoryPlan" in [e.reason for e in d.events]
    assert "MemoryPlan" not in [e.reason for e in decide(job, Observed(memory=short), None, d.status, NOW).events]
    fits = decide(job, Observed(memory=(True, "estimated ~7.0 GiB")), None, d.status, NOW)
    assert next(c for c in fits.status.document()["conditions"] if c["type"] == "MemoryFits")["status"] == "True"

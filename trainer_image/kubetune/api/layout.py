"""Where a job's files live. One pure function shared by the trainer, `kubetune run`,
the serving program and the operator, so they always agree.

    OUTPUT/adapter/        LoRA / prefix / prompt weights (small), for method lora|qlora|ptuning|prompt
    OUTPUT/model/          the servable full model: merged LoRA, or full/freeze weights
    OUTPUT/summary.json    final losses, runtime, tokens seen
    OUTPUT/metrics.jsonl   every logged step (loss, lr, grad norm, tokens/s, ...)
    OUTPUT/tensorboard/    TensorBoard event files (spec.training.reportTo: [tensorboard])
    CHECKPOINTS/step-000000100/ ... + manifest.json (written last = committed)
    CHECKPOINTS/progress.json   what the operator reads for status
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .spec import FineTuneJob
from .uri import Uri, parse_uri

ADAPTER_METHODS = ("lora", "qlora", "ptuning", "prompt")
MERGEABLE_METHODS = ("lora", "qlora")


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class JobLayout:
    output: Uri
    checkpoints: Uri
    adapter: Optional[Uri]  # None for full/freeze
    model: Optional[Uri]  # None when an adapter is not merged (ptuning/prompt, or merge: false)
    progress: Uri
    summary: Uri
    metrics: Uri
    tensorboard: Uri

    @property
    def needs_merge(self) -> bool:
        """Whether a merge step turns OUTPUT/adapter into OUTPUT/model (LoRA and QLoRA with
        output.merge): the one answer the operator, `kubetune run` and the merge step use."""
        return self.adapter is not None and self.model is not None

    @property
    def serving_model(self) -> Uri:
        """What the inference server loads: the merged/full model, else the adapter (on its base)."""
        return self.model or self.adapter  # type: ignore[return-value]


def job_layout(job: FineTuneJob, base_dir: Optional[str | Path] = None) -> JobLayout:
    """Locations of a job's outputs. Without base_dir (on a cluster) output.uri is required."""
    spec = job.spec
    if spec.output.uri:
        output = parse_uri(spec.output.uri, base_dir)
    elif base_dir is not None:
        output = parse_uri(str(Path(base_dir) / "runs" / job.metadata.name / "output"))
    else:
        raise LayoutError("spec.output.uri is required when the job runs on a cluster (e.g. s3://models/NAME)")
    checkpoints = parse_uri(spec.checkpoint.uri, base_dir) if spec.checkpoint.uri else output.join("checkpoints")
    method = spec.method.type
    adapter = output.join("adapter") if method in ADAPTER_METHODS else None
    merged = method not in ADAPTER_METHODS or (method in MERGEABLE_METHODS and spec.output.merge)
    return JobLayout(
        output=output,
        checkpoints=checkpoints,
        adapter=adapter,
        model=output.join("model") if merged else None,
        progress=checkpoints.join("progress.json"),
        summary=output.join("summary.json"),
        metrics=output.join("metrics.jsonl"),
        tensorboard=output.join("tensorboard"),
    )

"""Semantic checks of a FineTuneJob that the schema cannot express.

Shared by `kubetune validate` and the operator (which turns problems into an InvalidSpec
condition instead of starting pods); `job_warnings` lists what runs but is likely a mistake.
Pure: no I/O, no torch. Checks that need the cluster (does the credentials Secret exist?)
live in the operator.
"""

from __future__ import annotations

from dataclasses import dataclass

from .naming import NAME_LIMIT, worker_pod_name, workers_service_name
from .spec import FineTuneJob
from .uri import UriError, parse_uri


@dataclass(frozen=True)
class Problem:
    field: str  # dotted camelCase path, e.g. "spec.distributed.gpusPerNode"
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def check_job(job: FineTuneJob, *, on_cluster: bool) -> list[Problem]:
    """Every problem found (empty when the job can run). `on_cluster`: run by the operator."""
    problems: list[Problem] = []
    problems += _check_locations(job, on_cluster)
    problems += _check_distribution(job)
    problems += _check_method(job)
    problems += _check_training(job)
    problems += _check_serving(job)
    if on_cluster:
        problems += _check_names(job)
    return problems


def _check_locations(job: FineTuneJob, on_cluster: bool) -> list[Problem]:
    problems = []
    for field, value in job.spec.locations():
        try:
            uri = parse_uri(value, "/")
        except UriError as err:
            problems.append(Problem(field, str(err)))
            continue
        if on_cluster and uri.scheme == "file":
            problems.append(Problem(field, f"{value!r} is a local path, which pods cannot see; use s3://BUCKET/KEY or pvc://CLAIM/PATH"))
        if uri.scheme == "hf" and field != "spec.model.uri":
            problems.append(Problem(field, "hf:// is only supported for spec.model.uri"))
    if on_cluster and not job.spec.output.uri:
        problems.append(Problem("spec.output.uri", "required on a cluster: where the trained model goes (e.g. s3://models/NAME)"))
    return problems


def _check_distribution(job: FineTuneJob) -> list[Problem]:
    spec = job.spec
    problems = []
    dist, training = spec.distributed, spec.training
    gpus = spec.resources.limits.get("nvidia.com/gpu")
    if gpus is not None and str(gpus) not in ("0", str(dist.gpus_per_node)):
        problems.append(
            Problem(
                "spec.resources.limits.nvidia.com/gpu",
                f"{gpus} GPUs per pod but distributed.gpusPerNode is {dist.gpus_per_node}; "
                "one process runs per GPU, so they must match (leave the limit out: it is set from gpusPerNode; 0 means CPU-only nodes)",
            )
        )
    ds = dist.deepspeed_config
    world = dist.world_size
    expected = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.micro_batch_size * training.gradient_accumulation_steps * world,
    }
    for key, value in expected.items():
        if key in ds and ds[key] != value:
            problems.append(
                Problem(
                    f"spec.distributed.deepspeedConfig.{key}",
                    f"{ds[key]} does not match the job: {value} (microBatchSize {training.micro_batch_size} x "
                    f"gradientAccumulationSteps {training.gradient_accumulation_steps} x nodes {dist.nodes} x "
                    f"gpusPerNode {dist.gpus_per_node}); remove it, it is derived from those fields",
                )
            )
    zero = ds.get("zero_optimization", {})
    if isinstance(zero, dict) and "stage" in zero and zero["stage"] != dist.zero.stage:
        problems.append(
            Problem("spec.distributed.deepspeedConfig.zero_optimization.stage", f"{zero['stage']} contradicts distributed.zero.stage {dist.zero.stage}")
        )
    if dist.zero.stage == 3 and spec.method.type in ("ptuning", "prompt"):
        problems.append(Problem("spec.distributed.zero.stage", f"method {spec.method.type} keeps the base model whole; use stage 0-2"))
    return problems


def _check_method(job: FineTuneJob) -> list[Problem]:
    method = job.spec.method
    settings = method.settings()
    problems = []
    targets = getattr(settings, "target_modules", None)
    if targets and "all-linear" in targets and len(targets) > 1:
        problems.append(Problem(f"spec.method.{method.type}.targetModules", "all-linear already selects every linear layer; list either all-linear or module names"))
    if method.type == "qlora" and job.spec.training.precision == "fp32":
        problems.append(Problem("spec.training.precision", "qlora computes in 16 bits; use bf16, fp16 or auto"))
    return problems


def _check_training(job: FineTuneJob) -> list[Problem]:
    spec = job.spec
    problems = []
    evaluation = spec.training.eval
    if spec.dataset.validation is None:
        if evaluation.every_steps is not None:
            problems.append(Problem("spec.training.eval.everySteps", "needs a validation set: set dataset.validation ({ratio: 0.1} or {uri: ...})"))
        if evaluation.generate:
            problems.append(Problem("spec.training.eval.generate", "needs a validation set: set dataset.validation ({ratio: 0.1} or {uri: ...})"))
    return problems


def job_warnings(job: FineTuneJob) -> list[Problem]:
    """What runs as written but is likely not what the user meant. Never refused: `kubetune
    validate` and `kubetune run` print these, kubetune-train logs them, the operator posts
    each as a Warning event when the job starts."""
    spec = job.spec
    warnings = []
    if spec.training.max_steps is not None and spec.checkpoint.every_steps > spec.training.max_steps:
        warnings.append(
            Problem(
                "spec.checkpoint.everySteps",
                f"{spec.checkpoint.every_steps} is more than training.maxSteps {spec.training.max_steps}: only the final "
                "checkpoint (and one on preemption) is written, so a run that fails before the end starts over",
            )
        )
    return warnings


def _check_serving(job: FineTuneJob) -> list[Problem]:
    spec = job.spec
    if not spec.serving.enabled:
        return []
    problems = []
    if spec.serving.engine == "vllm" and spec.method.type in ("lora", "qlora") and not spec.output.merge:
        problems.append(Problem("spec.output.merge", "serving.engine vllm serves the merged model; set output.merge: true or use engine builtin"))
    return problems


def _check_names(job: FineTuneJob) -> list[Problem]:
    name = job.metadata.name
    problems = []
    if not name[0].isalpha():
        problems.append(Problem("metadata.name", f"{name!r} must start with a letter: the job's Services are named after it"))
    # The worker pods and the rendezvous Service are named after the job: both must stay valid
    # DNS labels (Services must start with a letter).
    last_worker = worker_pod_name(name, job.spec.distributed.nodes - 1)
    if max(len(last_worker), len(workers_service_name(name))) > NAME_LIMIT:
        problems.append(Problem("metadata.name", f"{name!r} is too long: pod {last_worker} exceeds {NAME_LIMIT} characters"))
    return problems

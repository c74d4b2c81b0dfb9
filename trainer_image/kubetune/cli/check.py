"""`kubetune validate` and `kubetune plan`: no torch, no cluster."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from ..api.spec import FineTuneJob, SpecError, line_of, load_job_text, read_job_text
from ..api.uri import UriError, parse_uri
from ..api.validation import check_job, job_warnings
from ..planner.estimate import PlanError, estimate, parse_memory, shipped_config, shipped_configs


def job_problems(path: str | Path, *, on_cluster: bool) -> tuple[Optional[FineTuneJob], list[str]]:
    """The job and every problem as `FILE:LINE: FIELD: MESSAGE` lines (schema, then deeper checks)."""
    try:
        text = read_job_text(path)
        job = load_job_text(text, str(path))
    except SpecError as err:
        return None, err.lines
    return job, [f"{_where(path, text, problem.field)}: {problem}" for problem in check_job(job, on_cluster=on_cluster)]


def warning_lines(path: str | Path, job: FineTuneJob) -> list[str]:
    """`FILE:LINE: warning: FIELD: MESSAGE` for what runs but is likely a mistake."""
    text = Path(path).read_text(encoding="utf-8")
    return [f"{_where(path, text, warning.field)}: warning: {warning}" for warning in job_warnings(job)]


def _where(path: str | Path, text: str, field: str) -> str:
    # Field paths are dotted YAML keys; a key with dots in it (nvidia.com/gpu), or one the
    # file leaves out, points at the nearest line the file has.
    line = line_of(text, field)
    return f"{path}:{line}" if line else str(path)


def count(n: int) -> str:
    """A parameter count as people write it: 8.03B, 40.4M, 922K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def validate_command(args) -> int:
    job, problems = job_problems(args.job, on_cluster=args.cluster)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{args.job}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        return 1
    for line in warning_lines(args.job, job):
        print(line, file=sys.stderr)
    where = "a cluster" if args.cluster else "this machine"
    print(f"{args.job}: valid FineTuneJob {job.metadata.name!r} ({job.spec.method.type}, {job.spec.distributed.world_size} process(es)) for {where}")
    return 0


# ---------------------------------------------------------------------------------------
# Finding the model's config


def gguf_config(path: str | Path) -> dict[str, Any]:
    """The config.json keys the planner needs, read from a GGUF file's metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else default

    arch = value("general.architecture", "llama")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    config = {
        "model_type": arch,
        "hidden_size": value(f"{arch}.embedding_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "vocab_size": value(f"{arch}.vocab_size", len(tokens.data) if tokens is not None else None),
        # No separate output matrix in the file means the embeddings are tied.
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    return {k: v for k, v in config.items() if v is not None}


def find_model_config(job: FineTuneJob, base_dir: Path, override: Optional[str] = None) -> tuple[dict[str, Any], str]:
    """The model's config and where it came from: --model-config, the model's config.json
    (local, s3://), its GGUF metadata, or a shipped config matching the model's name."""
    if override:
        path = Path(override)
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            return json.loads(path.read_text()), str(path)
        config = shipped_config(override)
        if config is None:
            raise PlanError(f"--model-config {override!r} is neither a config.json nor a shipped config ({', '.join(shipped_configs())})")
        return config, f"shipped config {override}"
    model = job.spec.model
    try:
        uri = parse_uri(model.uri, base_dir)
    except UriError as err:
        raise PlanError(f"spec.model.uri: {err}") from None
    if uri.scheme == "file":
        folder = Path(uri.path)
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text()), str(folder / "config.json")
        ggufs = [folder / model.gguf_file] if model.gguf_file else sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        if ggufs and ggufs[0].is_file():
            return gguf_config(ggufs[0]), str(ggufs[0])
    elif uri.scheme == "s3":
        from ..artifacts.storage import StorageError, open_store

        try:
            return json.loads(open_store(uri, endpoint=job.spec.storage.endpoint).get_bytes("config.json")), f"{uri}/config.json"
        except (FileNotFoundError, StorageError):
            pass
    config = shipped_config(uri.name or uri.bucket)
    if config is not None:
        return config, f"shipped config for {uri.name}"
    raise PlanError(
        f"no config.json found for {model.uri}; pass --model-config with a config.json path or a shipped config "
        f"({', '.join(shipped_configs())})"
    )


# ---------------------------------------------------------------------------------------
# plan


def human(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 / 10 else f"{n / 1024**2:.0f} MiB"


PARTS = {
    "weights": "model weights",
    "gradients": "gradients (trainable)",
    "optimizer": "optimizer states (trainable)",
    "activations": "activations",
    "logits": "logits + loss",
    "buffers": "DeepSpeed buffers",
    "overhead": "runtime + fragmentation",
}


def plan_command(args) -> int:
    job, problems = job_problems(args.job, on_cluster=False)
    if problems:  # what `kubetune validate` refuses is not planned either
        for line in problems:
            print(line, file=sys.stderr)
        return 1
    try:
        gpu_memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
        config, source = find_model_config(job, Path(args.job).resolve().parent, args.model_config)
        est = estimate(job, config, gpu_memory)
    except (PlanError, ValueError) as err:
        print(f"{args.job}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**est.to_dict(), "model_config": source}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    spec = job.spec
    table = Table(title=f"{job.metadata.name}: memory per GPU ({spec.method.type}, ZeRO-{spec.distributed.zero.stage}, offload {spec.distributed.zero.offload})")
    table.add_column("part")
    table.add_column("per GPU", justify="right")
    for key, label in PARTS.items():
        table.add_row(label, human(est.breakdown[key]))
    table.add_row("[bold]total per GPU[/]", f"[bold]{human(est.per_gpu_bytes)}[/]")
    table.add_row("host memory per node", human(est.host_bytes))
    console = Console()
    console.print(table)
    console.print(
        f"model config: {source}; {count(est.total_params)} parameters, {count(est.trainable_params)} trainable; "
        f"{est.world_size} process(es), micro batch {spec.training.micro_batch_size} x length {spec.training.max_length}, "
        f"gradient checkpointing {'on' if spec.training.gradient_checkpointing else 'off'}"
    )
    if est.fits is not None:
        verdict = "[green]fits[/]" if est.fits else "[red]does not fit[/]"
        console.print(f"{verdict} in {human(est.gpu_memory_bytes)} per GPU")
    for note in est.notes:
        console.print(f"note: {note}")
    return 0 if est.fits is not False else 3  # scripts can ask "does it fit?"

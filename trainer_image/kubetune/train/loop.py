"""One training run: data -> model -> DeepSpeed engine -> steps -> checkpoints -> export.

Order matters for users: the job and the data are validated before the model is fetched,
and the tokenizer (chat template, lengths) is checked before the weights are loaded, so bad
input fails in seconds with exit code 64 instead of after a long download.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import exitcodes
from ..checkpoint import CheckpointManager, RetryPolicy, with_retry
from ..data.batching import BatchPlan, collate, model_inputs, rows_from_samples, total_steps
from ..data.loader import DataError, load_datasets
from ..data.tokenize import LengthLimits, tokenize_examples
from ..layout import JobLayout, job_layout
from ..model_source import default_cache_dir, materialize_model, verify_export
from ..progress import Progress
from ..retention import Retention, describe
from ..spec import FineTuneJob
from ..storage import fetch, open_store
from .deepspeed_config import ADAM_BETAS, ADAM_EPS, build_deepspeed_config, model_hidden_size, uses_client_optimizer
from .events import emit
from .metrics import TrainMetrics
from .schedule import scheduler_factory

log = logging.getLogger("kubetune.train")


class ModelSourceError(ValueError):
    """spec.model.uri or method.adapterUri does not point at a usable model/adapter."""


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: Any

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """One process group for every launch: torchrun's environment, or a single plain process."""
    import deepspeed
    import torch

    if "RANK" not in os.environ:
        from ..testing import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, all ranks agree, then it saves."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: finishing the current step, then saving a checkpoint", signal.Signals(signum).name)
        self.requested = True

    def agreed(self, device) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class RunState:
    """What a checkpoint must carry besides the engine (the CheckpointManager's client_state)."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0  # micro batches of this epoch already consumed (same count on every rank)
    tokens_seen: int = 0
    losses: list = field(default_factory=list)  # [step, loss] at each log step
    validation_losses: list = field(default_factory=list)  # [step, loss]


class StatusWriter:
    """progress.json, metrics.jsonl and summary.json from rank 0, through the job's stores."""

    def __init__(self, job: FineTuneJob, layout: JobLayout, world_size: int, enabled: bool):
        self.enabled = enabled
        self.endpoint = job.spec.storage.endpoint
        self.layout = layout
        self.retry = RetryPolicy.from_env()
        self.progress = Progress(world_size=world_size)
        self.metrics_lines: list[str] = []
        self._stores: dict[str, Any] = {}

    def _put(self, store_uri, key: str, data: bytes) -> None:
        if self.enabled:
            store = self._stores.get(str(store_uri))
            if store is None:
                store = self._stores[str(store_uri)] = open_store(store_uri, endpoint=self.endpoint)
            with_retry(self.retry, f"writing {store_uri}/{key}", store.put_bytes, key, data)

    def update(self, **fields) -> None:
        for key, value in fields.items():
            setattr(self.progress, key, value)
        self.progress.updated_at = ""
        self._put(self.layout.checkpoints, "progress.json", self.progress.to_json())

    def fail(self, error: str) -> None:
        """Best effort: the operator shows this; a storage outage must not hide the real error."""
        try:
            self.update(phase="failed", error=error[:2000])
        except Exception as err:  # noqa: BLE001
            log.warning("could not record the failure in progress.json: %s", err)

    def restore_metrics(self, step: int) -> None:
        """After a resume, keep the metrics.jsonl lines of steps up to the checkpoint's."""
        if not self.enabled:
            return
        try:
            raw = open_store(self.layout.output, endpoint=self.endpoint).get_bytes("metrics.jsonl").decode()
        except FileNotFoundError:
            return
        self.metrics_lines = [line + "\n" for line in raw.splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]

    def flush_metrics(self) -> None:
        if self.metrics_lines:
            self._put(self.layout.output, "metrics.jsonl", "".join(self.metrics_lines).encode())

    def summary(self, summary: dict) -> None:
        import json

        self._put(self.layout.output, "summary.json", json.dumps(summary, indent=2, sort_keys=True).encode())


def _param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _zero3_loading(ds_config: dict):
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _hidden_size(model_dir: Path) -> Optional[int]:
    """The model's hidden size (config.json), which sizes the ZeRO buffers; None if unknown."""
    try:
        return model_hidden_size(json.loads((Path(model_dir) / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None


def _materialize_once_per_node(dist_info, model_spec, cache_dir, base_dir, endpoint):
    """Local rank 0 fills the node's model cache (download, GGUF conversion) while the other
    ranks wait; they then find it complete. Converting on several ranks at once raced."""
    import torch.distributed as dist

    first = dist_info.local_rank == 0
    if not first:
        dist.barrier()
    try:
        return materialize_model(model_spec, cache_dir, base_dir, endpoint)
    finally:
        if first:
            dist.barrier()  # also on failure, so the others never wait forever


def _grad_norm(model) -> float:
    """L2 norm of all gradients (already averaged across ranks at the accumulation boundary)."""
    import torch

    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in model_inputs(batch).items()}


def _sum_over_ranks(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def run(job: FineTuneJob, base_dir: Optional[Path]) -> int:
    """Train the job; returns the process exit code (0 or PREEMPTED). Raises on bad input;
    any failure after start is also recorded in progress.json (phase failed)."""
    from ..model.methods import check_method_runtime

    spec = job.spec
    layout = job_layout(job, base_dir)
    check_method_runtime(spec)
    endpoint = spec.storage.endpoint
    cache_dir = Path(os.environ.get("KUBETUNE_CACHE_DIR") or default_cache_dir())
    work = Path(tempfile.mkdtemp(prefix=f"kubetune-rank{os.environ.get('RANK', '0')}-"))

    # 1. Data, validated before any model file is touched (or DeepSpeed is even imported).
    examples, val_examples = load_datasets(spec.dataset, spec.training.seed, work / "data", base_dir, endpoint)
    retention = Retention.plan(job, len(examples), work / "retention", base_dir)  # [retention] its prompt files, checked as data
    dist_info = init_distributed()
    preemption = Preemption()
    status = StatusWriter(job, layout, dist_info.world_size, enabled=dist_info.main)
    status.update(phase="starting")

    try:
        return _train(job, base_dir, layout, dist_info, preemption, status, examples, val_examples, cache_dir, work, retention)
    except BaseException as err:
        if not isinstance(err, SystemExit):
            status.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        preemption.restore()


def _build_model(spec, model_dir: Path, precision: str, adapter_dir: Optional[Path]):
    """The model training starts from: the base (partitioned while a ZeRO-3 HfDeepSpeedConfig
    lives), the method applied."""
    from ..model.loader import load_model
    from ..model.methods import apply_method, quantization_config

    model = load_model(model_dir, spec, precision, quantization_config(spec))
    return apply_method(model, spec, model_dir, adapter_dir)


def _fetch_adapter(spec, work: Path, base_dir, endpoint) -> Optional[Path]:
    if not spec.method.adapter_uri:
        return None
    try:
        adapter_dir = fetch(spec.method.adapter_uri, work / "adapter", base_dir, endpoint)
        verify_export(adapter_dir, f"method.adapterUri {spec.method.adapter_uri}")
    except (FileNotFoundError, ValueError) as err:
        raise ModelSourceError(f"method.adapterUri: {err}") from None
    return adapter_dir


def _train(job: FineTuneJob, base_dir, layout: JobLayout, dist_info: Dist, preemption: Preemption, status: StatusWriter,
           examples, val_examples, cache_dir: Path, work: Path, retention: Optional[Retention]) -> int:
    import torch

    from ..model.loader import load_tokenizer, resolve_precision
    from ..model.methods import count_parameters

    spec = job.spec
    endpoint = spec.storage.endpoint
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device

    # 2. Model files and tokenizer; lengths and template checked before the weights load.
    status.update(phase="loading")
    try:
        model_dir = _materialize_once_per_node(dist_info, spec.model, cache_dir, base_dir, endpoint)
    except (FileNotFoundError, ValueError) as err:
        raise ModelSourceError(str(err)) from None
    tokenizer = load_tokenizer(model_dir, spec)
    t = spec.training
    limits = LengthLimits(t.max_length, t.max_source_length, t.max_target_length)
    plain = spec.dataset.format == "text"
    samples, stats = tokenize_examples(tokenizer, examples, limits, plain)
    if not samples:
        raise DataError(
            f"no training sample has an answer token left after truncation to training.maxLength {t.max_length} "
            f"(first: {stats.dropped_sources[0]}); raise training.maxLength or shorten the prompts"
        )
    val_samples, _ = tokenize_examples(tokenizer, val_examples, limits, plain)
    precision = resolve_precision(t.precision)
    ds_config = build_deepspeed_config(spec, world, precision, on_gpu=device.type == "cuda", hidden_size=_hidden_size(model_dir))
    adapter_dir = _fetch_adapter(spec, work, base_dir, endpoint)
    replay = []
    if retention is not None:  # [retention] the base model's own answers join the training samples
        key = retention.key(job, tokenizer, model_dir, adapter_dir, precision)
        retention.prepare(open_store(layout.checkpoints, endpoint=endpoint), key, tokenizer,
                          lambda: _build_model(spec, model_dir, precision, adapter_dir), ds_config, rank, world, device)
        replay = retention.replay_samples(tokenizer, limits)
        if dist_info.main:
            emit("replay", **retention.info)
    if stats.dropped or stats.truncated:
        log.warning("%d samples truncated, %d dropped (no answer token left): first dropped %s", stats.truncated, stats.dropped, stats.dropped_sources[:3])
    if stats.special_text:
        log.warning(
            "%d samples spell special tokens (e.g. <|im_end|>) in their text; they are trained as text, not as markup: first %s",
            stats.special_text, stats.special_text_sources[:3],
        )  # fmt: skip
    rows = rows_from_samples(samples + replay, t.max_length, t.packing, t.seed)
    val_rows = rows_from_samples(val_samples, t.max_length, t.packing, t.seed)
    plan = BatchPlan(len(rows), t.micro_batch_size, t.gradient_accumulation_steps, world)
    row_lengths = [len(r) for r in rows]
    steps = total_steps(plan, t.epochs, t.max_steps)

    # 3. Weights and method.
    torch.manual_seed(t.seed)
    # Under ZeRO-3, HfDeepSpeedConfig makes transformers build the model already partitioned
    # (deepspeed.zero.Init) and load_model streams the weights in one module at a time, so no
    # rank ever holds the whole model. Keep it alive until initialize.
    zero3_loading = _zero3_loading(ds_config)
    model = _build_model(spec, model_dir, precision, adapter_dir)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(1, total))

    # 4. DeepSpeed engine (always; stage 0 is plain data parallel).
    import deepspeed

    groups = _param_groups(model, t.weight_decay)
    optimizer = None
    if uses_client_optimizer(ds_config):
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=optimizer,
        lr_scheduler=scheduler_factory(steps, t.warmup_ratio, t.lr_scheduler),
        config=ds_config,
    )
    del zero3_loading

    # 5. Resume from the newest complete checkpoint.
    manager = CheckpointManager(
        layout.checkpoints,
        keep=spec.checkpoint.keep,
        local_dir=Path(os.environ.get("KUBETUNE_CHECKPOINT_LOCAL_DIR") or cache_dir / "checkpoint-staging" / job.metadata.name),
        rank=rank,
        world_size=world,
        endpoint=endpoint,
    )
    state = RunState()
    client_state = manager.resume(engine)
    if client_state is not None:
        state = RunState(**{k: v for k, v in client_state.items() if k in RunState.__dataclass_fields__})

    if client_state is not None:
        status.restore_metrics(state.step)
    metrics = TrainMetrics(job.metadata.name)
    if dist_info.main:
        try:
            metrics.serve()
        except OSError as err:  # a busy port must not stop training
            log.warning("Prometheus metrics not served: %s", err)
        emit("start", total_steps=steps, world_size=world, trainable_params=trainable, total_params=total,
             train_samples=len(samples), validation_samples=len(val_samples), rows=len(rows), precision=precision,
             zero_stage=spec.distributed.zero.stage, special_text_samples=stats.special_text, replay_samples=len(replay))
        if client_state is not None:
            emit("resume", **{"from": manager.loaded, "step": state.step})
    status.update(phase="training", step=state.step, total_steps=steps)

    def save(final: bool = False, wait: bool = True) -> str:
        """wait=False: return once the local files are written; the upload and commit run in the
        background (the next save, or a save with wait=True, joins them first)."""
        status.update(phase="saving")
        started = time.monotonic()
        name = manager.save(engine, state.step, asdict(state), wait=wait)
        seconds = time.monotonic() - started
        if dist_info.main:
            metrics.observe_checkpoint(seconds, time.time())
            # committed: the newest checkpoint a resume would use (name itself once its upload is done)
            emit("checkpoint", step=state.step, name=name, seconds=round(seconds, 3), committed=manager.committed)
            status.flush_metrics()
        committed = manager.committed  # with wait=False, the previous one (progress.json names committed ones only)
        status.update(phase="saving" if final else "training", last_checkpoint=committed,
                      last_checkpoint_uri=committed and str(layout.checkpoints.join(committed)), last_checkpoint_time=manager.committed_time)
        return name

    def evaluate() -> None:
        if not val_rows:
            return
        from ..evaluate import generation_metrics, validation_loss

        synced = engine.zero_optimization_partition_weights() and world > 1
        loss = validation_loss(engine.module, val_rows, tokenizer.pad_token_id, t.micro_batch_size, rank, world, device)
        record = {"step": state.step, "validation_loss": loss}
        if t.eval.generate and not plain:
            record.update(generation_metrics(engine.module, tokenizer, val_examples, t.eval.max_samples, t.eval.max_new_tokens, rank, world, synced, device))
        state.validation_losses.append([state.step, loss])
        if dist_info.main:
            metrics.observe_eval(loss)
            emit("eval", **record)
            status.metrics_lines.append(json.dumps({"event": "eval", **record}) + "\n")

    # 6. The loop.
    started = time.monotonic()
    window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.monotonic()
    steps_at_start = state.step
    engine.train()
    while state.step < steps:
        batches = plan.micro_batches(t.seed, state.epoch, spec.dataset.shuffle, rank, lengths=row_lengths)
        while state.micro_batch < len(batches) and state.step < steps:
            batch = collate([rows[i] for i in batches[state.micro_batch]], tokenizer.pad_token_id)
            loss = engine(**_to_device(batch, device)).loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            logging_step = boundary and ((state.step + 1) % t.log_every_steps == 0 or state.step + 1 == steps)
            # Without ZeRO, DeepSpeed clips fp32 gradients without keeping the norm: measure it here.
            own_norm = _grad_norm(engine.module) if logging_step and engine.zero_optimization_stage() == 0 else None
            engine.step()
            state.micro_batch += 1
            window_loss += float(loss.detach())
            window_micro += 1
            window_tokens += batch["num_tokens"]
            if not boundary:
                continue
            state.step += 1
            epoch_progress = state.epoch + state.micro_batch / len(batches)
            if state.step % t.log_every_steps == 0 or state.step == steps:
                mean_loss, tokens = _sum_over_ranks([window_loss / max(1, window_micro), window_tokens], device)
                mean_loss /= world
                elapsed = time.monotonic() - window_start
                grad_norm = engine.get_global_grad_norm()
                grad_norm = own_norm if grad_norm is None else grad_norm
                done_here = state.step - steps_at_start
                eta = (time.monotonic() - started) / done_here * (steps - state.step)
                state.tokens_seen += int(tokens)
                record = dict(step=state.step, total_steps=steps, epoch=round(epoch_progress, 4), loss=mean_loss,
                              learning_rate=engine.get_lr()[0], grad_norm=None if grad_norm is None else float(grad_norm),
                              tokens_per_second=tokens / elapsed if elapsed > 0 else None, eta_seconds=round(eta, 1))
                state.losses.append([state.step, mean_loss])
                if dist_info.main:
                    emit("step", **record)
                    metrics.observe_step(record, int(tokens))
                    status.metrics_lines.append(json.dumps({"event": "step", **record}) + "\n")
                status.update(step=state.step, epoch=record["epoch"], loss=mean_loss, learning_rate=record["learning_rate"],
                              tokens_per_second=record["tokens_per_second"], eta_seconds=record["eta_seconds"])
                window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.monotonic()
            if t.eval.every_steps and state.step % t.eval.every_steps == 0:
                evaluate()
            if preemption.agreed(device):
                save()
                if dist_info.main:
                    emit("preempted", step=state.step)
                metrics.close()
                return exitcodes.PREEMPTED
            if state.step % spec.checkpoint.every_steps == 0 and state.step < steps:
                save(wait=False)
        if state.micro_batch >= len(batches):
            if not t.eval.every_steps:
                evaluate()
            state.epoch += 1
            state.micro_batch = 0

    # 7. Final checkpoint, export, summary.
    if manager.loaded is None or state.step > steps_at_start:
        save(final=True)
    if not state.validation_losses or state.validation_losses[-1][0] != state.step:
        evaluate()
    kept = None
    if retention is not None:  # [retention] the tuned model answers the probes the base answered
        synced = engine.zero_optimization_partition_weights() and world > 1
        kept = retention.measure(engine.module, tokenizer, rank, world, synced, device)
        if dist_info.main:
            (log.warning if kept["below_threshold"] else log.info)("retention: %s", describe(kept))
            metrics.observe_retention(kept)
            emit("retention", **kept)
        status.update(retention={k: kept[k] for k in ("probes", "base_right", "kept", "kept_ratio", "warn_below", "below_threshold")}
                      | {"lost": [entry["question"] for entry in kept["lost"]]})
    status.update(phase="exporting")
    from ..export import save_trained

    outputs = save_trained(engine, engine.module, tokenizer, job, layout, model_dir)
    runtime = time.monotonic() - started
    summary = {
        "job": job.metadata.name,
        "method": spec.method.type,
        "steps": state.step,
        "total_steps": steps,
        "epochs": round(state.epoch + state.micro_batch / (plan.steps_per_epoch * t.gradient_accumulation_steps), 4),
        "world_size": world,
        "runtime_seconds": round(runtime, 3),
        "tokens_seen": state.tokens_seen,
        "first_loss": state.losses[0][1] if state.losses else None,
        "final_loss": state.losses[-1][1] if state.losses else None,
        "losses": state.losses,
        "validation_losses": state.validation_losses,
        "final_validation_loss": state.validation_losses[-1][1] if state.validation_losses else None,
        "trainable_params": trainable,
        "total_params": total,
        "train_samples": len(samples),
        "validation_samples": len(val_samples),
        "truncated_samples": stats.truncated,
        "dropped_samples": stats.dropped,
        "special_text_samples": stats.special_text,
        "replay_samples": len(replay),
        "outputs": outputs,
    }
    if kept is not None:
        summary["retention"] = kept
    if dist_info.main:
        status.flush_metrics()
        status.summary(summary)
    status.update(phase="done", outputs=outputs)
    if dist_info.main:
        emit("done", step=state.step, outputs=outputs, summary={k: v for k, v in summary.items() if k not in ("losses", "validation_losses", "retention")})
    metrics.close()
    return exitcodes.OK

"""The training run as a recipe (torchtune's shape): `setup` (model files, spec.retention's
base-model answers, data, model, engine, resume), `train` (the step loop, with periodic
`evaluate` and `save`), `finish` (final checkpoint, spec.retention's probes, export,
summary). The run's state lives in attributes: what a checkpoint must carry in `state`
(RunState), the rest rebuilt by `setup` on every start. Everything the run reports
goes through one Reporter (events, metrics, status files, trackers).

Order matters for users: the tokenizer (chat template, lengths) is checked before the weights
are loaded, so bad input fails in seconds with exit code 64 instead of after a long load.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..api import exitcodes
from ..api.layout import JobLayout
from ..api.spec import FineTuneJob
from ..artifacts.checkpoint import CheckpointManager
from ..artifacts.model_source import ModelSourceError, check_model_source, materialize_model
from ..artifacts.storage import fetch, open_store
from ..data.batching import model_inputs
from ..data.cache import TokenCache
from ..data.loader import Example
from ..data.pipeline import Epoch, length_limits, prepare
from ..data.tokenize import Sample
from ..retention import Retention
from .deepspeed_config import build_deepspeed_config
from .engine import build_engine, grad_norm, hidden_size, zero3_loading
from .loss import LossWindow, TokenWeighting, forward_backward
from .reporter import Reporter

log = logging.getLogger("kubetune.train")


@dataclass
class RunState:
    """What a checkpoint must carry besides the engine (the CheckpointManager's client_state)."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0  # micro batches of this epoch already consumed (same count on every rank)
    tokens_seen: int = 0
    losses: list = field(default_factory=list)  # [step, loss] at each log step
    validation_losses: list = field(default_factory=list)  # [step, loss]


@dataclass
class RunContext:
    """What the process gives the recipe: the job, where it runs, and its inputs."""

    job: FineTuneJob
    base_dir: Optional[Path]
    layout: JobLayout
    dist: Any  # loop.Dist
    preemption: Any  # loop.Preemption
    reporter: Reporter
    examples: list[Example]
    val_examples: list[Example]
    cache_dir: Path
    work: Path
    retention: Optional[Retention] = None  # spec.retention's prompt sets, planned with the data


class FineTuneRecipe:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.spec = ctx.job.spec
        self.dist = ctx.dist
        self.reporter = ctx.reporter
        self.state = RunState()
        self.window = LossWindow()
        self.own_grad_norm: Optional[float] = None  # measured here under ZeRO stage 0 (see _micro_step)
        self.replay: list[Sample] = []  # spec.retention: the base model's answers, trained beside the data
        self.reworded: list[Sample] = []  # spec.retention.paraphrases: the user's questions in the base model's words, with the user's answers
        self.retention_report: Optional[dict] = None  # spec.retention: the probe figures after training

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        self._setup_files()
        self._setup_retention()
        self._setup_data()
        self._setup_model()
        self._setup_engine()
        self._resume()

    def _setup_files(self) -> None:
        """Model files, tokenizer, adapter to continue from, precision and DeepSpeed config."""
        from ..model.loader import load_tokenizer, resolve_precision

        self.reporter.phase("loading")
        try:
            self.model_dir = self.dist.once_per_node(materialize_model, self.spec.model, self.ctx.cache_dir, self.ctx.base_dir, self.spec.storage.endpoint)
        except (FileNotFoundError, ValueError) as err:
            raise ModelSourceError(str(err)) from None
        self.tokenizer = load_tokenizer(self.model_dir, self.spec)
        self.adapter_dir = self._adapter_dir()
        self.precision = resolve_precision(self.spec.training.precision)
        on_gpu = self.dist.device.type == "cuda"
        self.ds_config = build_deepspeed_config(self.spec, self.dist.world_size, self.precision, on_gpu=on_gpu, hidden_size=hidden_size(self.model_dir))
        self.checkpoint_store = open_store(self.ctx.layout.checkpoints, endpoint=self.spec.storage.endpoint)

    def _setup_retention(self) -> None:
        """spec.retention: the base model answers the replay prompts and the probes and rewrites
        the user's questions (or all of it comes from the cache beside the checkpoints) before
        the training model is built; its replay answers and the rewritten questions join the
        training data."""
        retention, d = self.ctx.retention, self.dist
        if retention is None:
            return
        key = retention.key(self.ctx.job, self.tokenizer, self.model_dir, self.adapter_dir, self.precision)
        retention.prepare(self.checkpoint_store, key, self.tokenizer, self._build_model, self.ds_config, d.rank, d.world_size, d.device)
        self.replay = retention.replay_samples(self.tokenizer, length_limits(self.spec), self.spec.replay_loss())
        self.reworded = retention.reworded_samples(self.tokenizer, length_limits(self.spec))
        self.reporter.replay(retention.info)

    def _setup_data(self) -> None:
        """The data, tokenized with the model's own template (cached), the replay and reworded samples added."""
        cache = TokenCache(self.checkpoint_store, self.ctx.cache_dir / "tokenized", self.dist.once_per_node)
        started = time.monotonic()
        self.data = prepare(self.spec, self.tokenizer, self.ctx.examples, self.ctx.val_examples, self.dist.world_size, cache, self.replay + self.reworded)
        self.data_seconds = time.monotonic() - started  # tokenizing (or reading the cached tokens), packing, planning

    def _build_model(self):
        """The model training starts from: the base weights, the method's trainable parameters on top."""
        from ..model.loader import load_model
        from ..model.methods import apply_method, quantization_config

        model = load_model(self.model_dir, self.spec, self.precision, quantization_config(self.spec))
        return apply_method(model, self.spec, self.model_dir, self.adapter_dir)

    def _setup_model(self) -> None:
        import torch

        from ..model.methods import count_parameters

        torch.manual_seed(self.spec.training.seed)
        # Under ZeRO-3 the model is built already partitioned and load_model streams the
        # weights in one module at a time, so no rank ever holds the whole model.
        self._zero3_loading = zero3_loading(self.ds_config)
        self.model = self._build_model()
        self.trainable, self.total = count_parameters(self.model)
        log.info("trainable parameters: %s of %s (%.4f%%)", f"{self.trainable:,}", f"{self.total:,}", 100.0 * self.trainable / max(1, self.total))

    def _adapter_dir(self) -> Optional[Path]:
        """The LoRA to continue from (method.adapterUri), fetched and checked; None without one."""
        uri = self.spec.method.adapter_uri
        if not uri:
            return None
        try:
            adapter_dir = fetch(uri, self.ctx.work / "adapter", self.ctx.base_dir, self.spec.storage.endpoint)
            check_model_source(adapter_dir, f"method.adapterUri {uri}")
        except (FileNotFoundError, ValueError) as err:
            raise ModelSourceError(f"method.adapterUri: {err}") from None
        return adapter_dir

    def _setup_engine(self) -> None:
        t = self.spec.training
        self.engine = build_engine(self.model, self.ds_config, t.learning_rate, t.weight_decay, self.data.total_steps, t.warmup_ratio, t.lr_scheduler)
        self._zero3_loading = None
        self.weighting = TokenWeighting.of(self.engine)

    def _resume(self) -> None:
        """Restore the newest complete checkpoint, if any; then report the start."""
        local = os.environ.get("KUBETUNE_CHECKPOINT_LOCAL_DIR") or self.ctx.cache_dir / "checkpoint-staging" / self.ctx.job.metadata.name
        self.manager = CheckpointManager(self.ctx.layout.checkpoints, keep=self.spec.checkpoint.keep, local_dir=Path(local),
                                         rank=self.dist.rank, world_size=self.dist.world_size, endpoint=self.spec.storage.endpoint)  # fmt: skip
        client_state = self.manager.resume(self.engine)
        if client_state is not None:
            self.state = RunState(**{k: v for k, v in client_state.items() if k in RunState.__dataclass_fields__})
        data = self.data
        self.reporter.start(
            self.manager.loaded, self.state.step, data.total_steps, world_size=self.dist.world_size,
            trainable_params=self.trainable, total_params=self.total, train_samples=len(data.samples),
            validation_samples=len(data.val_samples), replay_samples=len(self.replay), reworded_samples=len(self.reworded), rows=len(data.rows), precision=self.precision,
            zero_stage=self.spec.distributed.zero.stage, special_text_samples=data.stats.special_text,
            packing_fill=data.packing_fill, tokens_from=data.tokens_from, data_seconds=round(self.data_seconds, 2),
        )  # fmt: skip

    # ------------------------------------------------------------------ train

    def train(self) -> int:
        """The step loop; returns exitcodes.OK at the end, PREEMPTED after a preemption save."""
        spec, state = self.spec, self.state
        self.started = self.window_start = time.monotonic()
        self.steps_at_start = state.step
        self.engine.train()
        while state.step < self.data.total_steps:
            epoch = self.data.epoch(spec.training.seed, state.epoch, spec.dataset.shuffle, self.dist.rank)
            while state.micro_batch < len(epoch.batches) and state.step < self.data.total_steps:
                if self._micro_step(epoch):
                    code = self._after_step(epoch)
                    if code is not None:
                        return code
            if state.micro_batch >= len(epoch.batches):
                if not spec.training.eval.every_steps:
                    self.evaluate()
                state.epoch += 1
                state.micro_batch = 0
        return exitcodes.OK

    def _logs(self, step: int) -> bool:
        return step % self.spec.training.log_every_steps == 0 or step == self.data.total_steps

    def _micro_step(self, epoch: Epoch) -> bool:
        """Forward and backward of this rank's next micro batch (token-weighted loss), and the
        optimizer step at the accumulation boundary. True at the boundary."""
        from ..data.batching import collate

        state, engine = self.state, self.engine
        batch = collate([self.data.rows[i] for i in epoch.batches[state.micro_batch]], self.tokenizer.pad_token_id)
        inputs = {k: v.to(self.dist.device) if hasattr(v, "to") else v for k, v in model_inputs(batch).items()}
        distill = batch.get("distill")
        distill = None if distill is None else distill.to(self.dist.device)
        loss = forward_backward(engine, inputs, batch["trained_tokens"], epoch.step_tokens_at(state.micro_batch), self.weighting, distill)
        boundary = engine.is_gradient_accumulation_boundary()
        # Without ZeRO, DeepSpeed clips fp32 gradients without keeping the norm: measure it here.
        if boundary and self._logs(state.step + 1) and engine.zero_optimization_stage() == 0:
            self.own_grad_norm = grad_norm(engine.module)
        engine.step()
        state.micro_batch += 1
        self.window.add(loss, batch["trained_tokens"], batch["num_tokens"])
        return boundary

    def _after_step(self, epoch: Epoch) -> Optional[int]:
        """Log, evaluate, checkpoint or stop after optimizer step `state.step` (done)."""
        state, t = self.state, self.spec.training
        state.step += 1
        if self._logs(state.step):
            self._log_step(epoch)
        if t.eval.every_steps and state.step % t.eval.every_steps == 0:
            self.evaluate()
        if self.ctx.preemption.agreed(self.dist.device):
            self.save()
            self.reporter.preempted(state.step)
            return exitcodes.PREEMPTED
        if state.step % self.spec.checkpoint.every_steps == 0 and state.step < self.data.total_steps:
            self.save(wait=False)
        return None

    def _log_step(self, epoch: Epoch) -> None:
        """Collective: the log record of the steps since the last one."""
        state, engine, steps = self.state, self.engine, self.data.total_steps
        mean_loss, tokens = self.window.totals(self.dist.device)
        now = time.monotonic()
        elapsed, self.window_start = now - self.window_start, now
        norm = engine.get_global_grad_norm()
        norm = self.own_grad_norm if norm is None else norm
        eta = (now - self.started) / (state.step - self.steps_at_start) * (steps - state.step)
        state.tokens_seen += tokens
        record = dict(step=state.step, total_steps=steps, epoch=round(state.epoch + state.micro_batch / len(epoch.batches), 4),
                      loss=mean_loss, learning_rate=engine.get_lr()[0], grad_norm=None if norm is None else float(norm),
                      tokens_per_second=tokens / elapsed if elapsed > 0 else None, eta_seconds=round(eta, 1))  # fmt: skip
        state.losses.append([state.step, mean_loss])
        self.reporter.step(record, tokens)

    # ------------------------------------------------------------------ save, evaluate

    def save(self, final: bool = False, wait: bool = True) -> str:
        """Collective checkpoint. wait=False: return once the local files are written; the upload
        and commit run in the background (the next save, or one with wait=True, joins them)."""
        self.reporter.phase("saving")
        started = time.monotonic()
        name = self.manager.save(self.engine, self.state.step, asdict(self.state), wait=wait)
        # with wait=False `committed` is still the previous one (progress.json names committed ones only)
        self.reporter.checkpoint(self.state.step, name, time.monotonic() - started, self.manager.committed, self.manager.committed_time, final)
        return name

    def evaluate(self) -> None:
        """Collective: validation loss (and generation metrics when asked for) on the held-out rows."""
        if not self.data.val_rows:
            return
        from .evaluate import generation_metrics, validation_loss

        t, d, module = self.spec.training, self.dist, self.engine.module
        synced = self.engine.zero_optimization_partition_weights() and d.world_size > 1
        loss = validation_loss(module, self.data.val_rows, self.tokenizer.pad_token_id, t.micro_batch_size, d.rank, d.world_size, d.device)
        record = {"step": self.state.step, "validation_loss": loss}
        if t.eval.generate and self.spec.dataset.format != "text":
            record.update(generation_metrics(module, self.tokenizer, self.ctx.val_examples, t.eval.max_samples, t.eval.max_new_tokens,
                                             d.rank, d.world_size, synced, d.device))  # fmt: skip
        self.state.validation_losses.append([self.state.step, loss])
        self.reporter.evaluation(record)

    # ------------------------------------------------------------------ finish

    def finish(self) -> int:
        """Final checkpoint and evaluation, export, summary."""
        from .export import save_trained

        state = self.state
        if self.manager.loaded is None or state.step > self.steps_at_start:
            self.save(final=True)
        if not state.validation_losses or state.validation_losses[-1][0] != state.step:
            self.evaluate()
        self.probe()
        self.reporter.phase("exporting")
        outputs = save_trained(self.engine, self.engine.module, self.tokenizer, self.ctx.job, self.ctx.layout, self.model_dir)
        self.reporter.done(state.step, self.summary(outputs), outputs)
        return exitcodes.OK

    def probe(self) -> None:
        """Collective (spec.retention): the tuned model answers the probes the base answered
        before training; the figures go to every sink."""
        if self.ctx.retention is None:
            return
        d = self.dist
        synced = self.engine.zero_optimization_partition_weights() and d.world_size > 1
        self.retention_report = self.ctx.retention.measure(self.engine.module, self.tokenizer, d.rank, d.world_size, synced, d.device)
        self.reporter.retention(self.retention_report)

    def summary(self, outputs: dict) -> dict:
        state, data, spec = self.state, self.data, self.spec
        last = lambda pairs: pairs[-1][1] if pairs else None  # noqa: E731
        return {
            "job": self.ctx.job.metadata.name,
            "method": spec.method.type,
            "steps": state.step,
            "total_steps": data.total_steps,
            "epochs": round(state.epoch + state.micro_batch / (data.plan.steps_per_epoch * spec.training.gradient_accumulation_steps), 4),
            "world_size": self.dist.world_size,
            "runtime_seconds": round(time.monotonic() - self.started, 3),
            "tokens_seen": state.tokens_seen,
            "first_loss": state.losses[0][1] if state.losses else None,
            "final_loss": last(state.losses),
            "losses": state.losses,
            "validation_losses": state.validation_losses,
            "final_validation_loss": last(state.validation_losses),
            "trainable_params": self.trainable,
            "total_params": self.total,
            "train_samples": len(data.samples),
            "validation_samples": len(data.val_samples),
            "truncated_samples": data.stats.truncated,
            "dropped_samples": data.stats.dropped,
            "special_text_samples": data.stats.special_text,
            "packing_fill": data.packing_fill,
            "replay_samples": len(self.replay),
            "reworded_samples": len(self.reworded),
            "outputs": outputs,
        } | ({"retention": self.retention_report} if self.retention_report is not None else {})

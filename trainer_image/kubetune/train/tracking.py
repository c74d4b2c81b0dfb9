"""Experiment trackers (spec.training.reportTo): TensorBoard, SwanLab, Weights & Biases, MLflow.

Each tracker gets, from rank 0 and at the steps the trainer logs them, the figures it exports
as `kubetune_train_*` (loss, learning rate, grad norm, tokens/s, epoch, and GPU memory when
training on GPUs) as `train/NAME`, and every evaluation figure (validation loss, exact match,
token F1, ROUGE-1/2/L, BLEU-4) as `eval/NAME`.

The interface is small: a Tracker logs scalars at a step and closes. Its base class turns the
trainer's step and evaluation records into scalars (`step(record)`, `evaluation(record)`),
which is what the trainer's reporter calls, and keeps a failing tracker (a flapping W&B
server) from stopping training: the failure is logged once and training goes on.

Credentials never pass through KubeTune: each library reads its own environment variables
(spec.TRACKER_ENV), which the operator fills from the Secret named by
spec.training.reportSecret and a local run takes from the user's shell. Nothing here reads,
logs or stores them, and the libraries' console capture is off (only metrics and the job's
spec, which holds no credentials, are sent). Offline modes are the libraries' own
(WANDB_MODE=offline, SWANLAB_MODE=offline or local, an MLflow tracking URI of file: or sqlite:).

A restarted or resumed job continues the same tracker run: W&B and SwanLab through a run id
made from the job name and its checkpoint location, MLflow through a tag holding that id,
TensorBoard through a purge step (events at or after the first step a process logs replace
those an earlier attempt logged there). TensorBoard writes its event files into
OUTPUT/tensorboard: directly when OUTPUT is a folder; for s3:// into a local folder whose
files are uploaded through the storage layer every SYNC_SECONDS and at the end, so
`tensorboard --logdir` on the folder, or on a copy synced from S3, shows the curves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..api.layout import JobLayout
from ..api.spec import FineTuneJob, dump_job
from ..api.uri import Uri
from ..artifacts.storage import StorageError, open_store

log = logging.getLogger("kubetune.train.tracking")

# The step record's figures that are also kubetune_train_* gauges (step is the x axis).
TRAIN_FIGURES = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch")
PROJECT = "kubetune"  # default project / experiment name; each library's own variable overrides it
SYNC_SECONDS = 30.0


class TrackerError(ValueError):
    """spec.training.reportTo names a tracker that cannot start here (package or settings missing)."""


def gpu_memory_scalars() -> dict[str, float]:
    """Rank 0's GPU memory, as the kubetune_train_gpu_memory_bytes gauge reports it; none on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"train/gpu_memory_allocated_bytes": float(torch.cuda.memory_allocated()),
            "train/gpu_memory_peak_bytes": float(torch.cuda.max_memory_allocated())}  # fmt: skip


def train_scalars(record: dict) -> dict[str, float]:
    """A logged step's tracker scalars: train/loss, train/learning_rate, ... (None is left out)."""
    scalars = {f"train/{name}": float(record[name]) for name in TRAIN_FIGURES if record.get(name) is not None}
    return {**scalars, **gpu_memory_scalars()}


def eval_scalars(record: dict) -> dict[str, float]:
    """An evaluation's tracker scalars: eval/validation_loss, eval/rouge_l, ... (numbers only)."""
    return {f"eval/{k}": float(v) for k, v in record.items() if k not in ("step", "event") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_id(job: FineTuneJob, layout: JobLayout) -> str:
    """Stable across restarts of one job (same name, same checkpoints), distinct for a new job."""
    digest = hashlib.sha256(str(layout.checkpoints).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^a-zA-Z0-9_-]', '-', job.metadata.name)[:40]}-{digest}"


class Tracker:
    """Logs scalars at a step; `close(failed)` ends the run. Subclasses implement `log` and `_close`."""

    name = "tracker"
    hint = ""  # what the user can set when a run cannot start

    def __init__(self):
        self._failed_once = False

    def _started(self, start: Callable[[], Any]) -> Any:
        """start(), with any failure turned into a TrackerError that says what to set."""
        try:
            return start()
        except Exception as err:  # noqa: BLE001 - the libraries raise many kinds for missing keys or servers
            raise TrackerError(f"spec.training.reportTo {self.name}: cannot start a run ({type(err).__name__}: {err}); {self.hint}") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _close(self, failed: bool) -> None:
        raise NotImplementedError

    def step(self, record: dict) -> None:
        self._safely(self.log, train_scalars(record), record["step"])

    def evaluation(self, record: dict) -> None:
        self._safely(self.log, eval_scalars(record), record["step"])

    def close(self, failed: bool = False) -> None:
        self._safely(self._close, failed)

    def _safely(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - a tracker outage must not stop training
            if not self._failed_once:
                log.warning("%s: %s: %s (training goes on; further failures of this tracker are not logged)", self.name, type(err).__name__, err)
                self._failed_once = True


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, destination: Uri, endpoint: Optional[str] = None, sync_seconds: float = SYNC_SECONDS):
        super().__init__()
        _import("tensorboard")  # torch.utils.tensorboard writes with it
        if destination.scheme == "file":
            self.folder, self.store = Path(destination.path), None
        else:
            self.folder = Path(tempfile.mkdtemp(prefix="kubetune-tensorboard-"))
            self.store = open_store(destination, endpoint=endpoint)
        self.sync_seconds = sync_seconds
        self.writer = None
        self.uploaded: dict[str, int] = {}  # file name -> size already uploaded
        self.last_sync = time.monotonic()

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops what earlier event files logged at or after this step
            # (an attempt that ran past its last checkpoint before a restart).
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=step)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if self.store is not None and time.monotonic() - self.last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Upload the event files that grew since the last upload."""
        if self.writer is not None:
            self.writer.flush()
        if self.store is None:
            return
        self.last_sync = time.monotonic()
        for path in sorted(self.folder.iterdir()):
            size = path.stat().st_size
            if path.is_file() and self.uploaded.get(path.name) != size:
                self.store.put_file(path, path.name)
                self.uploaded[path.name] = size

    def _close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()
        try:
            self.sync()
        except StorageError as err:
            raise StorageError(f"TensorBoard event files not uploaded: {err}") from None
        if self.store is not None:
            shutil.rmtree(self.folder, ignore_errors=True)  # the local staging copy, now uploaded


def _run_identity(job: FineTuneJob, layout: JobLayout) -> dict[str, Any]:
    """The run as W&B and SwanLab name it: resumed by id when the job restarts."""
    return {"name": job.metadata.name, "id": run_id(job, layout), "resume": "allow", "config": dump_job(job)["spec"]}


class WandbTracker(Tracker):
    name = "wandb"
    hint = ("put WANDB_API_KEY (and WANDB_BASE_URL for a private server) in the Secret named by spec.training.reportSecret, "
            "or set WANDB_MODE=offline")  # fmt: skip

    def __init__(self, job: FineTuneJob, layout: JobLayout):
        super().__init__()
        wandb = _import(self.name)
        self.run = self._started(lambda: wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, **_run_identity(job, layout),
                                                    settings=wandb.Settings(console="off", silent=True)))  # fmt: skip

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def _close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class SwanLabTracker(Tracker):
    name = "swanlab"
    hint = ("put SWANLAB_API_KEY (and SWANLAB_API_HOST for a private server) in the Secret named by spec.training.reportSecret, "
            "or set SWANLAB_MODE=offline")  # fmt: skip

    def __init__(self, job: FineTuneJob, layout: JobLayout):
        super().__init__()
        swanlab = _import(self.name)
        settings = swanlab.Settings(interactive=False, terminal=swanlab.Settings.Terminal(proxy_type="none"))
        self.run = self._started(lambda: swanlab.init(project=os.environ.get("SWANLAB_PROJ_NAME") or PROJECT, **_run_identity(job, layout),
                                                      settings=settings))  # fmt: skip

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def _close(self, failed: bool) -> None:
        self.run.finish(state="crashed" if failed else "success")


class MlflowTracker(Tracker):
    name = "mlflow"
    hint = "put MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN) in the Secret named by spec.training.reportSecret"
    TAG = "kubetune.run_id"

    def __init__(self, job: FineTuneJob, layout: JobLayout):
        super().__init__()
        _import(self.name)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI and its credentials: MLflow's own variables
        self.run_id = self._started(lambda: self._open(job, layout))

    def _open(self, job: FineTuneJob, layout: JobLayout) -> str:
        """The run of an earlier attempt of this job (marked running again), else a new one."""
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        identity = run_id(job, layout)
        earlier = self.client.search_runs([experiment_id], filter_string=f"tags.`{self.TAG}` = '{identity}'", max_results=1)
        if earlier:
            self.client.update_run(earlier[0].info.run_id, status="RUNNING")
            return earlier[0].info.run_id
        run = self.client.create_run(experiment_id, run_name=job.metadata.name, tags={self.TAG: identity}).info.run_id
        self._log_params(run, dump_job(job)["spec"])
        return run

    def _log_params(self, run: str, spec: dict) -> None:
        from mlflow.entities import Param

        flat = _flatten({k: spec[k] for k in ("model", "method", "training", "distributed") if k in spec})
        params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run, params=params[start : start + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def _close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _import(tracker: str):
    """The tracker's package (its name is the tracker's and the extra's that installs it)."""
    import importlib

    try:
        return importlib.import_module(tracker)
    except ImportError:
        raise TrackerError(f"spec.training.reportTo {tracker}: the {tracker} package is not installed; pip install 'kubetune[{tracker}]'") from None


def build_trackers(job: FineTuneJob, layout: JobLayout, is_main: bool) -> list[Tracker]:
    """The trackers of spec.training.reportTo, started (rank 0 only; other ranks get none).
    Raises TrackerError when one cannot start, closing those already started."""
    if not is_main:
        return []
    kinds = {
        "tensorboard": lambda: TensorBoardTracker(layout.tensorboard, job.spec.storage.endpoint),
        "wandb": lambda: WandbTracker(job, layout),
        "swanlab": lambda: SwanLabTracker(job, layout),
        "mlflow": lambda: MlflowTracker(job, layout),
    }
    trackers: list[Tracker] = []
    try:
        for name in job.spec.training.report_to:
            trackers.append(kinds[name]())
    except BaseException:
        for tracker in trackers:
            tracker.close(failed=True)
        raise
    return trackers

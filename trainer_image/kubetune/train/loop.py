"""One training run as a process: read and check the data, join the process group, then run
the recipe (recipe.py: setup -> train -> finish) with one Reporter for everything it reports.

Order matters for users: the job and the data are validated before the model is fetched
(or DeepSpeed is even imported), so bad input fails in seconds with exit code 64.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from ..api import exitcodes
from ..api.layout import job_layout
from ..api.spec import FineTuneJob
from ..artifacts.model_source import default_cache_dir
from ..data.loader import load_datasets
from ..retention import Retention
from .events import EventStream
from .recipe import FineTuneRecipe, RunContext
from .reporter import Reporter
from .tracking import build_trackers

log = logging.getLogger("kubetune.train")

T = TypeVar("T")


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: Any

    @property
    def main(self) -> bool:
        return self.rank == 0

    def once_per_node(self, fn: Callable[..., T], *args) -> T:
        """Collective: local rank 0 runs fn first (filling a node-local cache: a model download,
        a GGUF conversion, the tokenized data) while the node's other ranks wait; they then run
        fn and find the cache complete. Doing the work on several ranks at once raced."""
        import torch.distributed as dist

        first = self.local_rank == 0
        if not first:
            dist.barrier()
        try:
            return fn(*args)
        finally:
            if first:
                dist.barrier()  # also on failure, so the others never wait forever


def init_distributed() -> Dist:
    """One process group for every launch: torchrun's environment, or a single plain process."""
    import deepspeed
    import torch

    if "RANK" not in os.environ:
        from ..artifacts.net import free_port

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


def run(job: FineTuneJob, base_dir: Optional[Path], events: EventStream) -> int:
    """Train the job; returns the process exit code (0 or PREEMPTED). Raises on bad input;
    any failure after start is also recorded in progress.json (phase failed)."""
    from ..model.methods import check_method_runtime

    spec = job.spec
    layout = job_layout(job, base_dir)
    check_method_runtime(spec)
    cache_dir = Path(os.environ.get("KUBETUNE_CACHE_DIR") or default_cache_dir())
    work = Path(tempfile.mkdtemp(prefix=f"kubetune-rank{os.environ.get('RANK', '0')}-"))

    # Data, validated before any model file is touched (or DeepSpeed is even imported).
    examples, val_examples = load_datasets(spec.dataset, spec.training.seed, work / "data", base_dir, spec.storage.endpoint)
    retention = Retention.plan(job, examples, work / "retention", base_dir)  # its prompt files, checked like the data
    dist_info = init_distributed()
    # Trackers start before the model loads: a missing package or setting fails in seconds.
    reporter = Reporter(job, layout, dist_info.world_size, main=dist_info.main, events=events, trackers=build_trackers(job, layout, dist_info.main))
    preemption = Preemption()
    reporter.phase("starting")
    ctx = RunContext(job, base_dir, layout, dist_info, preemption, reporter, examples, val_examples, cache_dir, work, retention)
    failed = True
    try:
        recipe = FineTuneRecipe(ctx)
        recipe.setup()
        code = recipe.train()
        code = recipe.finish() if code == exitcodes.OK else code
        failed = False
        return code
    except BaseException as err:
        if not isinstance(err, SystemExit):
            reporter.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        reporter.close(failed=failed)
        preemption.restore()

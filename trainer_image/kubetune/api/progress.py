"""progress.json: the trainer's small status document next to the checkpoints.

The trainer (rank 0) rewrites it at start, every log step, after each checkpoint commit
and at the end; the operator and `kubetune status` read it without talking to the pod.
Pure parse/format here; writing goes through a Store.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

PHASES = ("starting", "loading", "training", "saving", "exporting", "merging", "done", "failed")


@dataclass
class Progress:
    phase: str = "starting"
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    tokens_per_second: Optional[float] = None
    eta_seconds: Optional[float] = None
    last_checkpoint: Optional[str] = None  # e.g. "step-000000100", newest committed
    last_checkpoint_uri: Optional[str] = None
    last_checkpoint_time: Optional[str] = None  # ISO 8601 UTC of the commit
    outputs: dict[str, Optional[str]] = field(default_factory=dict)  # {"adapter": uri, "model": uri}
    # spec.retention's probe figures once measured: probes, base_right, kept, kept_ratio,
    # warn_below, below_threshold, lost (the questions whose right answer was lost)
    retention: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    world_size: int = 1
    updated_at: str = ""

    @property
    def percent(self) -> float:
        return round(100.0 * self.step / self.total_steps, 1) if self.total_steps else 0.0

    def to_json(self) -> bytes:
        data = asdict(self)
        data["updated_at"] = self.updated_at or utc_now()
        return json.dumps(data, sort_keys=True).encode()


def utc_now(ts: Optional[float] = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_progress(raw: bytes | str) -> Progress:
    """Parse progress.json, ignoring unknown keys (a newer trainer may add some)."""
    data: dict[str, Any] = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("progress.json is not a JSON object")
    known = {k: v for k, v in data.items() if k in Progress.__dataclass_fields__}
    progress = Progress(**known)
    if progress.phase not in PHASES:
        raise ValueError(f"progress.json has unknown phase {progress.phase!r}")
    return progress

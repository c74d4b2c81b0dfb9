"""Checkpoints in S3-compatible storage or a folder: manager.py (save, resume, rotation),
manifest.py (the per-checkpoint file list with hashes, written last), retry.py (storage
retries, shared with exports), rng.py (random states)."""

from .manager import CheckpointError, CheckpointManager, CheckpointMismatch, NoUsableCheckpoint, TrainableMismatch, WorldSizeMismatch
from .manifest import MANIFEST, Manifest, ManifestError, checkpoint_name, checkpoint_step, parse_manifest, plan_rotation
from .retry import RetryPolicy, with_retry

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatch",
    "Manifest",
    "ManifestError",
    "NoUsableCheckpoint",
    "RetryPolicy",
    "TrainableMismatch",
    "WorldSizeMismatch",
    "checkpoint_name",
    "checkpoint_step",
    "parse_manifest",
    "plan_rotation",
    "with_retry",
]

"""spec.retention: keep what the base model knew, and show how much of it was kept.

- sets.py     the shipped replay prompts and probe questions (package data in prompts/), or
              the user's files; which prompts a job replays (seeded)
- generate.py greedy answers, batched and split across the ranks (ZeRO-3 included)
- phase.py    before training: the base model's answers (cached beside the checkpoints),
              its replay answers as training samples; after training: the probe report
- measure.py  the probe figures: how many answers the base got right are still right
"""

from .measure import describe, is_correct, retention_report
from .phase import Retention

__all__ = ["Retention", "describe", "is_correct", "retention_report"]

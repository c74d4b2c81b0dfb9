"""spec.retention: keep what the base model knew, and show how much of it was kept.

- sets.py     the shipped replay prompts and probe questions (package data in prompts/), or
              the user's files; which prompts a job replays (seeded)
- generate.py greedy answers, batched and split across the ranks (ZeRO-3 included); for
              replay also the base's top-k distribution at each answer token (replay.loss kl)
- paraphrase.py  spec.retention.paraphrases: the few-shot requests that have the base model
              rewrite the user's questions, and the checks a rewrite must pass
- phase.py    before training: the base model's answers, their distributions and rewrites
              (cached beside the checkpoints), as training samples; after training: the probe report
- measure.py  the probe figures: how many answers the base got right are still right
"""

from .measure import describe, is_correct, retention_report
from .phase import Retention

__all__ = ["Retention", "describe", "is_correct", "retention_report"]

"""The data pipeline of a run, composed in one place: examples (already read and converted
by loader.py) -> token ids and labels (tokenize.py, once per job: cache.py) -> rows, packed
or not (batching.py) -> the plan of optimizer steps, and per epoch each rank's micro batches
with the trained tokens of every step (what the token-weighted loss divides by).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from ..api.spec import FineTuneJobSpec
from .batching import BatchPlan, Row, fill_ratio, rows_from_samples, total_steps
from .cache import TokenCache, Tokenized, cache_key
from .loader import DataError, Example
from .tokenize import LengthLimits, Sample, TokenizeStats, tokenize_examples

log = logging.getLogger("kubetune.data")


@dataclass(frozen=True)
class Epoch:
    """One epoch as this rank trains it."""

    batches: list[list[int]]  # this rank's micro batches (row indices), in order
    step_tokens: list[int]  # trained tokens of each optimizer step, all ranks together
    accumulation: int

    def step_tokens_at(self, micro_batch: int) -> int:
        """Trained tokens of the optimizer step that micro batch `micro_batch` belongs to."""
        return self.step_tokens[micro_batch // self.accumulation]


@dataclass
class PreparedData:
    samples: list[Sample]
    val_samples: list[Sample]
    stats: TokenizeStats
    rows: list[Row]
    val_rows: list[Row]
    plan: BatchPlan
    total_steps: int
    packing_fill: Optional[float]  # tokens / (rows x maxLength) when packing, else None
    tokens_from: str  # "tokenized", or where the cached tokens came from: "local", "fetched"
    extra: list[Sample]  # spec.retention's replay and reworded samples, trained beside `samples` (never in the token cache)

    def __post_init__(self):
        self.row_lengths = [len(r) for r in self.rows]
        self.row_trained_tokens = [r.trained_tokens for r in self.rows]

    def epoch(self, seed: int, epoch: int, shuffle: bool, rank: int) -> Epoch:
        order = self.plan.epoch_order(seed, epoch, shuffle, lengths=self.row_lengths)
        return Epoch(self.plan.deal(order, rank), self.plan.step_sums(order, self.row_trained_tokens), self.plan.accumulation)


def length_limits(spec: FineTuneJobSpec) -> LengthLimits:
    t = spec.training
    return LengthLimits(t.max_length, t.max_source_length, t.max_target_length)


def tokenize_datasets(spec: FineTuneJobSpec, tokenizer, examples: list[Example], val_examples: list[Example],
                      cache: Optional[TokenCache] = None) -> tuple[Tokenized, str]:  # fmt: skip
    """((samples, stats, validation samples), where they came from) of the training and
    validation examples: from the cache when it holds them, else tokenized (and cached)."""
    limits, plain = length_limits(spec), spec.dataset.format == "text"

    def tokenize() -> Tokenized:
        samples, stats = tokenize_examples(tokenizer, examples, limits, plain)
        return samples, stats, tokenize_examples(tokenizer, val_examples, limits, plain)[0]

    if cache is None:
        return tokenize(), "tokenized"
    tokenized = cache.get(cache_key(examples, val_examples, tokenizer, limits, plain), tokenize)
    return tokenized, cache.source


def prepare(spec: FineTuneJobSpec, tokenizer, examples: list[Example], val_examples: list[Example], world_size: int,
            cache: Optional[TokenCache] = None, extra: Sequence[Sample] = ()) -> PreparedData:  # fmt: skip
    """Tokenize (or take the cached tokens), check, pack and plan the job's data for `world_size`
    ranks. `extra`: samples tokenized elsewhere (spec.retention's base-model answers and reworded questions), trained
    beside the examples' samples; the token cache keeps the examples' samples only, so a
    changed replay or rewrite set can never be served from it."""
    t = spec.training
    (samples, stats, val_samples), tokens_from = tokenize_datasets(spec, tokenizer, examples, val_examples, cache)
    if not samples:
        raise DataError(
            f"no training sample has an answer token left after truncation to training.maxLength {t.max_length} "
            f"(first: {stats.dropped_sources[0]}); raise training.maxLength or shorten the prompts"
        )
    if stats.dropped or stats.truncated:
        log.warning("%d samples truncated, %d dropped (no answer token left): first dropped %s", stats.truncated, stats.dropped, stats.dropped_sources[:3])
    if stats.special_text:
        log.warning(
            "%d samples spell special tokens (e.g. <|im_end|>) in their text; they are trained as text, not as markup: first %s",
            stats.special_text, stats.special_text_sources[:3],
        )  # fmt: skip
    rows = rows_from_samples(samples + list(extra), t.max_length, t.packing, t.seed)
    val_rows = rows_from_samples(val_samples, t.max_length, t.packing, t.seed)
    plan = BatchPlan(len(rows), t.micro_batch_size, t.gradient_accumulation_steps, world_size)
    fill = fill_ratio(rows, t.max_length) if t.packing else None
    return PreparedData(samples, val_samples, stats, rows, val_rows, plan, total_steps(plan, t.epochs, t.max_steps), fill, tokens_from, list(extra))

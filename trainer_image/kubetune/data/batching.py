"""Packing, deterministic data order and the collator.

Data order is a pure function of (seed, epoch): resuming is skipping to a position, and
every rank computes the same global order and takes its own share of each step.

Packing puts samples into rows of at most maxLength tokens, best-fit decreasing (as TRL's
"bfd" strategy does): longest sample first, each into the open row whose free space fits it
most tightly, a new row only when none fits. Rows fill 97-99.9% of maxLength on mixed-length
chat data where next-fit (start a new row when the next sample does not fit) left 10-20%
empty. No sample is split. Rows are then listed in input order (each by its first sample),
and the samples of a row keep their input order, so the result is a pure function of the
samples: with the seeded shuffle before it, deterministic for a seed, and a resumed run
rebuilds exactly the rows it was training on.

Each sample keeps its own position ids starting at 0; with no 2D attention mask and no KV
cache, transformers turns restarting position ids into a block-diagonal causal mask
(`find_packed_sequence_indices`), so a token never attends to another sample in its row.
`model_inputs` builds exactly those forward arguments (use_cache=False matters: a cache
switches the detection off); tests/trainer/test_packing.py proves the isolation.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .tokenize import IGNORE, BaseTargets, Sample


@dataclass
class Row:
    """One training row: a single sample, or several packed ones."""

    input_ids: list[int]
    labels: list[int]
    position_ids: Optional[list[int]] = None  # set for packed rows
    distill: Optional[list[tuple[int, BaseTargets]]] = None  # (where in the row, the targets of the tokens from there) per distill sample

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss counts: trained labels after the first position (nothing predicts
        a row's first token; transformers' causal LM loss shifts the labels by one)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, each summing to <= capacity) chosen best-fit decreasing,
    in input order: a bin is listed by its first item, its items in input order. Among equal
    lengths the earlier item goes first. O(n log n): open bins are kept by free space."""
    bins: list[list[int]] = []
    open_bins: dict[int, list[int]] = {}  # free space -> bins with exactly that much free
    spaces: list[int] = []  # the keys of open_bins, sorted
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        need = lengths[item]
        at = bisect.bisect_left(spaces, need)
        if at == len(spaces):  # nothing fits: open a new bin
            bins.append([item])
            target, free = len(bins) - 1, capacity - need
        else:  # the tightest fit
            space = spaces[at]
            target = open_bins[space].pop()
            if not open_bins[space]:
                del open_bins[space], spaces[at]
            bins[target].append(item)
            free = space - need
        if free > 0:
            if free not in open_bins:
                open_bins[free] = []
                bisect.insort(spaces, free)
            open_bins[free].append(target)
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def pack(samples: list[Sample], max_length: int) -> list[Row]:
    """Best-fit-decreasing packing (module doc); no sample is split (each is <= max_length)."""
    rows = []
    for members in best_fit_decreasing([len(s) for s in samples], max_length):
        row = Row([], [], [])
        for i in members:
            row.input_ids += samples[i].input_ids
            row.labels += samples[i].labels
            row.position_ids += list(range(len(samples[i])))
        row.distill = _distill_spans([samples[i] for i in members])
        rows.append(row)
    return rows


def _distill_spans(samples: list[Sample]) -> Optional[list[tuple[int, BaseTargets]]]:
    """Of the samples laid end to end, where each distill sample's targets start, with them (None when none has any)."""
    spans, end = [], 0
    for s in samples:
        end += len(s)
        if s.distill is not None:
            spans.append((end - len(s.distill), s.distill))
    return spans or None


def fill_ratio(rows: list[Row], max_length: int) -> float:
    """Share of the rows' capacity (rows x maxLength) that holds tokens."""
    return sum(len(r) for r in rows) / (len(rows) * max_length) if rows else 0.0


def rows_from_samples(samples: list[Sample], max_length: int, packing: bool, seed: int) -> list[Row]:
    if not packing:
        return [Row(s.input_ids, s.labels, distill=_distill_spans([s])) for s in samples]
    # Pack in a seeded shuffled order so packs mix samples from the whole file.
    order = list(range(len(samples)))
    random.Random(f"pack:{seed}").shuffle(order)
    return pack([samples[i] for i in order], max_length)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


@dataclass(frozen=True)
class BatchPlan:
    """How rows become optimizer steps: micro x accumulation x world rows per step."""

    rows: int
    micro_batch_size: int
    accumulation: int
    world_size: int

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # The last step of an epoch is filled up by wrapping around to the epoch's start.
        return max(1, -(-self.rows // self.rows_per_step))

    def epoch_order(self, seed: int, epoch: int, shuffle: bool, lengths: Optional[list[int]] = None) -> list[int]:
        """The rows of one epoch for all ranks together, step after step (what every rank
        computes alike and deals its share from); the last step wraps around to the start.

        With `lengths`, the rows of each optimizer step are sorted by length before they are
        dealt out: a step still trains on the same rows, but each micro batch holds rows of
        similar length (less padding) and all ranks get similar lengths at the same time
        (less waiting for the slowest rank).
        """
        order = epoch_order(self.rows, seed, epoch, shuffle)
        needed = self.steps_per_epoch * self.rows_per_step
        order = (order * (-(-needed // len(order))))[:needed]
        if lengths is not None:
            per_step = self.rows_per_step
            order = [i for s in range(0, needed, per_step) for i in sorted(order[s : s + per_step], key=lambda i: -lengths[i])]
        return order

    def deal(self, order: list[int], rank: int) -> list[list[int]]:
        """This rank's micro batches (row indices) of an epoch order, in order."""
        mb, world = self.micro_batch_size, self.world_size
        return [order[(k * world + rank) * mb : (k * world + rank + 1) * mb] for k in range(len(order) // (mb * world))]

    def micro_batches(self, seed: int, epoch: int, shuffle: bool, rank: int, lengths: Optional[list[int]] = None) -> list[list[int]]:
        """This rank's micro batches (row indices) for one epoch, in order."""
        return self.deal(self.epoch_order(seed, epoch, shuffle, lengths), rank)

    def step_sums(self, order: list[int], values: list[int]) -> list[int]:
        """Per optimizer step of an epoch order, the sum of `values` over the step's rows on
        every rank (e.g. the trained tokens a token-weighted loss divides by)."""
        per_step = self.rows_per_step
        return [sum(values[i] for i in order[s : s + per_step]) for s in range(0, len(order), per_step)]


def total_steps(plan: BatchPlan, epochs: Optional[float], max_steps: Optional[int]) -> int:
    if max_steps is not None:
        return max_steps
    return max(1, round((epochs or 1.0) * plan.steps_per_epoch))


def collate(rows: list[Row], pad_id: int) -> dict:
    """Pad to the longest row in the batch (right padding), never to maxLength. Packed rows
    carry position ids and no attention mask; their padding is a separate pseudo-sample."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    packed = rows[0].position_ids is not None
    mask_or_pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        if packed:
            mask_or_pos[i, :n] = torch.tensor(row.position_ids)
            mask_or_pos[i, n:] = torch.arange(width - n)
        else:
            mask_or_pos[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels}
    batch["position_ids" if packed else "attention_mask"] = mask_or_pos
    if any(r.distill for r in rows):
        batch["distill"] = DistillBatch.of(rows, width)  # not a forward argument: the loss reads it (train/loss.py)
    # Non-padding tokens (what tokens/s counts) and the tokens the loss averages over; not
    # forward arguments (model_inputs leaves them out).
    batch["num_tokens"] = sum(len(r) for r in rows)
    batch["trained_tokens"] = sum(r.trained_tokens for r in rows)
    return batch


@dataclass(frozen=True)
class DistillBatch:
    """A batch's replayed answer tokens and the base model's distributions there: `mask`
    [rows, width] marks them; `ids` [rows, width, k] and `logp` [rows, width, k+1] hold their
    BaseTargets (zeros elsewhere)."""

    mask: Any
    ids: Any
    logp: Any

    @classmethod
    def of(cls, rows: list[Row], width: int) -> "DistillBatch":
        import torch

        k = next(t.ids.shape[1] for r in rows if r.distill for _, t in r.distill)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        ids = torch.zeros((len(rows), width, k), dtype=torch.long)
        logp = torch.zeros((len(rows), width, k + 1), dtype=torch.float32)
        for i, row in enumerate(rows):
            for start, targets in row.distill or ():
                end = start + len(targets)
                mask[i, start:end] = True
                ids[i, start:end] = targets.ids
                logp[i, start:end] = targets.logp
        return cls(mask, ids, logp)

    def to(self, device) -> "DistillBatch":
        return DistillBatch(self.mask.to(device), self.ids.to(device), self.logp.to(device))


COUNTS = ("num_tokens", "trained_tokens")
NOT_FORWARD = (*COUNTS, "distill")  # what collate adds for the loss and the logs, never for the model


def model_inputs(batch: dict) -> dict:
    """Forward-pass arguments for a collated batch (labels included; token counts and the distill mask removed)."""
    inputs = {k: v for k, v in batch.items() if k not in NOT_FORWARD}
    inputs["use_cache"] = False
    return inputs

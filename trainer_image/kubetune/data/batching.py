"""Packing, deterministic data order and the collator.

Data order is a pure function of (seed, epoch): resuming is skipping to a position, and
every rank computes the same global order and takes its own share of each step.

Packing concatenates samples into rows of at most maxLength tokens. Each sample keeps its
own position ids starting at 0; with no 2D attention mask and no KV cache, transformers
turns restarting position ids into a block-diagonal causal mask
(`find_packed_sequence_indices`), so a token never attends to another sample in its row.
`model_inputs` builds exactly those forward arguments (use_cache=False matters: a cache
switches the detection off); tests/trainer/test_packing.py proves the isolation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from .tokenize import IGNORE, Sample


@dataclass
class Row:
    """One training row: a single sample, or several packed ones."""

    input_ids: list[int]
    labels: list[int]
    position_ids: Optional[list[int]] = None  # set for packed rows

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(samples: list[Sample], max_length: int) -> list[Row]:
    """Next-fit packing in the given order; no sample is split (each is <= max_length)."""
    rows: list[Row] = []
    current = Row([], [], [])
    for sample in samples:
        if len(current) + len(sample) > max_length and len(current):
            rows.append(current)
            current = Row([], [], [])
        current.input_ids += sample.input_ids
        current.labels += sample.labels
        current.position_ids += list(range(len(sample)))
    if len(current):
        rows.append(current)
    return rows


def rows_from_samples(samples: list[Sample], max_length: int, packing: bool, seed: int) -> list[Row]:
    if not packing:
        return [Row(s.input_ids, s.labels) for s in samples]
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

    def micro_batches(self, seed: int, epoch: int, shuffle: bool, rank: int, lengths: Optional[list[int]] = None) -> list[list[int]]:
        """This rank's micro batches (row indices) for one epoch, in order.

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
        mb, world = self.micro_batch_size, self.world_size
        batches = []
        for k in range(needed // (mb * world)):
            start = (k * world + rank) * mb
            batches.append(order[start : start + mb])
        return batches


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
    # Non-padding tokens (what tokens/s counts); pop it before the forward pass.
    batch["num_tokens"] = sum(len(r) for r in rows)
    return batch


def model_inputs(batch: dict) -> dict:
    """Forward-pass arguments for a collated batch (labels included, token count removed)."""
    inputs = {k: v for k, v in batch.items() if k != "num_tokens"}
    inputs["use_cache"] = False
    return inputs

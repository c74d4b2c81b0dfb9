"""Per-sequence next-token choice for a batch whose rows each carry their own settings.

The processors follow transformers' `generate` order and formulas (repetition penalty and
no-repeat-ngram first, then temperature, top-k, top-p), so a greedy row picks exactly the
token `model.generate(do_sample=False, ...)` picks for the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as vLLM's ignore_eos

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalty: one batched argmax serves every such row."""
        return self.greedy and self.repetition_penalty == 1.0 and self.no_repeat_ngram_size == 0


def banned_ngram_tokens(history: Sequence[int], size: int) -> list[int]:
    """Tokens that would repeat an n-gram of `size` already present in `history`."""
    if size <= 0 or len(history) + 1 < size:
        return []
    prefix = tuple(history[len(history) - size + 1 :]) if size > 1 else ()
    banned = []
    for start in range(len(history) - size + 1):
        if tuple(history[start : start + size - 1]) == prefix:
            banned.append(history[start + size - 1])
    return banned


def process_row(scores: torch.Tensor, history: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """Penalties and warpers for one row of logits (shape [V]); returns filtered scores."""
    scores = scores.float()
    if params.repetition_penalty != 1.0 and history:
        ids = torch.tensor(sorted(set(history)), dtype=torch.long, device=scores.device)
        ids = ids[ids < scores.numel()]
        picked = scores[ids]
        scores = scores.clone()
        scores[ids] = torch.where(picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty)
    if params.no_repeat_ngram_size > 0:
        banned = banned_ngram_tokens(history, params.no_repeat_ngram_size)
        if banned:
            scores = scores.clone()
            scores[torch.tensor(banned, dtype=torch.long, device=scores.device)] = -float("inf")
    if params.greedy:
        return scores
    scores = scores / params.temperature
    if 0 < params.top_k < scores.numel():
        threshold = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, -float("inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), -float("inf"))
    return scores


class SamplingError(ValueError):
    """One row's settings gave no valid distribution over its next token."""


def choose_next_tokens(
    logits: torch.Tensor,
    histories: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[Union[int, SamplingError]]:
    """One next token per row of `logits` ([B, V]) under that row's own settings.

    A row whose settings break its arithmetic gets a SamplingError in place of a token; the
    other rows are chosen exactly as if it were not there.
    """
    chosen: list[Union[int, SamplingError]] = [0] * logits.shape[0]
    plain = [i for i, p in enumerate(params) if p.plain_greedy]
    if plain:
        for i, token in zip(plain, logits[plain].argmax(-1).tolist()):
            chosen[i] = token
    for i, p in enumerate(params):
        if p.plain_greedy:
            continue
        try:
            chosen[i] = _choose(logits[i], histories[i], p, generators[i])
        except Exception as err:  # noqa: BLE001 - whatever breaks one row stays in that row
            chosen[i] = err if isinstance(err, SamplingError) else SamplingError(f"{type(err).__name__}: {err}")
    return chosen


def _choose(logits: torch.Tensor, history: Sequence[int], params: SamplingParams, generator: torch.Generator) -> int:
    scores = process_row(logits, history, params)
    if params.greedy:
        if torch.isnan(scores).any():
            raise SamplingError("the scores of the next token are not numbers")
        return int(scores.argmax())
    probs = scores.softmax(-1)
    if not torch.isfinite(probs).all():
        raise SamplingError(
            f"temperature {params.temperature} with repetition_penalty {params.repetition_penalty} gives no valid distribution over the next token"
        )
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))

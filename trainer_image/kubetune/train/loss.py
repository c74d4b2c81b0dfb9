"""The loss of an optimizer step is the mean over all answer tokens of the step.

A causal LM returns each micro batch's loss as the mean over its own trained tokens. Left to
DeepSpeed, those means are averaged again: `engine.backward` divides every micro batch's loss
by gradient_accumulation_steps, and the gradients are averaged over the data-parallel ranks
(`gradient_allreduce_op` mean, stages 0-3: `allreduce_bucket`, ZeRO-1/2's
`gradient_reduction_w_predivide` and ZeRO-3's `__avg_scatter_contiguous_grads` all divide by
the data-parallel world size; DeepSpeed 0.19). One answer token in a short micro batch then
weighs as much as all the tokens of a long one: up to 20x on mixed-length chat data.

As Hugging Face's Trainer does since 2024 (`num_items_in_batch`), each micro batch's loss is
rescaled so that what DeepSpeed sums and averages is the sum of its token losses divided by
the trained tokens of the whole step, on every rank:

    backward loss_i = mean_i * n_i * (accumulation * ranks averaged over) / N_step

so the step's gradient is grad(sum of every token's loss) / N_step, with and without
packing, for any ZeRO stage. N_step needs no communication: every rank computes the same
global data order (`BatchPlan.epoch_order`), so each knows the trained tokens of every row
of the step (`BatchPlan.step_sums`). The mean of each micro batch times n_i (rather than the
model's `num_items_in_batch`) works for every model, remote code included.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenWeighting:
    """How much DeepSpeed divides a micro batch's gradient by: accumulation steps times the
    data-parallel ranks it averages over (1 when it sums them, `gradient_allreduce_op: sum`)."""

    divided_by: float

    @classmethod
    def of(cls, engine) -> "TokenWeighting":
        ranks = engine.dp_world_size if engine.gradient_average else 1
        return cls(float(engine.gradient_accumulation_steps() * ranks))

    def backward_loss(self, mean_loss, tokens: int, step_tokens: int):
        """The loss to pass to `engine.backward` for a micro batch whose model loss is the
        mean over its `tokens` trained tokens, in a step with `step_tokens` on all ranks."""
        return mean_loss * (tokens * self.divided_by / step_tokens)


def top_k_distribution(logits, k: int):
    """(ids [..., k], log-probabilities [..., k+1]) of a next-token distribution kept to its k
    most likely tokens and one bucket for the rest of the vocabulary (the last column)."""
    import torch.nn.functional as F

    logp = F.log_softmax(logits.float(), dim=-1)
    ids = logp.topk(min(k, logp.shape[-1] - 1), dim=-1).indices
    return ids, on_buckets(logp, ids)


def on_buckets(logp, ids):
    """Log-probabilities [..., k+1] of the tokens `ids` [..., k] and of all other tokens together."""
    import torch

    rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([logp.gather(-1, ids), rest.clamp(min=-1e4)], dim=-1)


def forward_backward(engine, inputs: dict, trained_tokens: int, step_tokens: int, weighting: TokenWeighting, distill=None) -> float:
    """Forward and backward of one micro batch with the token-weighted loss; returns the
    model's loss (the mean over the micro batch's trained tokens). `distill`: the batch's
    replayed answer tokens and the base model's distributions there (a DistillBatch, distilled_loss)."""
    loss = engine(**inputs).loss if distill is None else distilled_loss(engine, inputs, distill)
    engine.backward(weighting.backward_loss(loss, trained_tokens, step_tokens))
    return float(loss.detach())


def distilled_loss(engine, inputs: dict, distill):
    """The mean over the micro batch's trained tokens of each token's loss: cross-entropy to its
    label, or, at the replayed answer tokens of `distill` (spec.retention.replay.loss kl),
    KL(base || tuned) between the base model's next-token distribution and the tuned model's.

    The base model's distributions were recorded while it generated those answers, before
    training (retention/generate.py), kept to their REPLAY_TOP_K most likely tokens (api/spec.py) and one
    bucket for the rest of the vocabulary; the tuned model's is read on the same buckets. That
    KL is the full-vocabulary KL of the two distributions coarsened to those k+1 outcomes: 0
    where the tuned model still agrees with the base (a fresh LoRA), at most the full KL, and
    its gradient moves the tuned model's mass toward the base's likely tokens, unlike the greedy
    answer's one-hot label, which sharpens the model onto one answer. No base forward runs in
    training, so it works for every method (full and freeze too, which keep no copy of the
    base) and under ZeRO-3 the ranks' forward passes stay in step.
    """
    import torch.nn.functional as F

    from ..data.tokenize import IGNORE

    forward = {k: v for k, v in inputs.items() if k != "labels"}
    labels = inputs["labels"][:, 1:]  # the token each position predicts
    length = inputs["labels"].shape[1]
    trained = labels != IGNORE
    kl_at = trained & distill.mask[:, 1:]
    logits = engine(**forward).logits[:, -length:-1]  # prompt learning puts virtual tokens first
    ce_at = trained & ~kl_at
    total = F.cross_entropy(logits[ce_at].float(), labels[ce_at], reduction="sum")
    if kl_at.any():
        tuned = on_buckets(F.log_softmax(logits[kl_at].float(), dim=-1), distill.ids[:, 1:][kl_at])
        total = total + F.kl_div(tuned, distill.logp[:, 1:][kl_at], log_target=True, reduction="sum")
    return total / trained.sum().clamp(min=1)


class LossWindow:
    """Token-weighted loss and token counts since the last log step, on this rank."""

    def __init__(self):
        self.loss_sum = 0.0  # sum over trained tokens of their loss
        self.trained_tokens = 0
        self.tokens = 0  # non-padding tokens

    def add(self, mean_loss: float, trained_tokens: int, tokens: int) -> None:
        self.loss_sum += mean_loss * trained_tokens
        self.trained_tokens += trained_tokens
        self.tokens += tokens

    def totals(self, device) -> tuple[float, int]:
        """Collective: (mean loss over every trained token of the window on all ranks,
        non-padding tokens of all ranks); the window starts again."""
        import torch
        import torch.distributed as dist

        sums = torch.tensor([self.loss_sum, self.trained_tokens, self.tokens], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(sums)
        loss_sum, trained, tokens = sums.tolist()
        self.__init__()
        return loss_sum / max(1.0, trained), int(tokens)

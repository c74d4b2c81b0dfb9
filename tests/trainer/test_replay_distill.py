"""spec.retention.replay.loss kl: replayed answers are trained toward the base model's
next-token distributions (its top-k and one bucket for the rest, recorded while it wrote the
answers), the user's data by cross-entropy, all averaged over the micro batch's trained tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kubetune.api.spec import FineTuneJob
from kubetune.api.validation import check_job
from kubetune.data.batching import collate, model_inputs, rows_from_samples
from kubetune.data.tokenize import IGNORE, BaseTargets, LengthLimits, Sample
from kubetune.retention.phase import replay_sample
from kubetune.train.loss import distilled_loss, on_buckets, top_k_distribution

K = 8


class Engine:
    """What distilled_loss uses of a DeepSpeed engine: calling it runs the module's forward."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)


def lora_model(model_dir, method: str = "lora"):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method == "prompt":
        return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


def perturb(model, seed: int = 0) -> None:
    """Move the adapter away from a no-op, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def batch_of(samples: list[Sample], packing: bool) -> dict:
    rows = rows_from_samples(samples, 64, packing, seed=0)
    return collate(rows, pad_id=0)


def base_targets(base_dir, prompt: list[int], answer: list[int]) -> BaseTargets:
    """The base model's top-K distributions at each answer token, from a forward pass of its own."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
    return BaseTargets(*top_k_distribution(logits, K))


def samples(base_dir, tokenizer_size: int = 512) -> tuple[Sample, Sample]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, tokenizer_size, (2, 14), generator=generator).tolist()
    user = Sample(ids[0], [IGNORE] * 6 + ids[0][6:])  # the user's data: cross-entropy
    replay = replay_sample(ids[1][:5], ids[1][5:], LengthLimits(64), base_targets(base_dir, ids[1][:5], ids[1][5:]))  # a replayed answer: KL
    return user, replay


def expected_loss(model, base_dir, batch: dict, full: bool = False) -> float:
    """By hand: cross-entropy at user tokens, KL(base || tuned) at replayed ones on the base's
    top K tokens and the rest of the vocabulary as one outcome (with `full`, over the whole
    vocabulary), the base loaded afresh from its folder and run on the batch."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    inputs = model_inputs(batch)
    labels = inputs.pop("labels")[:, 1:]
    with torch.no_grad():
        length = labels.shape[1] + 1
        tuned = F.log_softmax(model(**inputs).logits[:, -length:-1].float(), -1)
        reference = F.log_softmax(base(**inputs).logits[:, :-1].float(), -1)
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == IGNORE:
                continue
            count += 1
            if batch["distill"].mask[b, t + 1]:
                top = reference[b, t].topk(K).indices
                rest = torch.ones_like(reference[b, t], dtype=torch.bool)
                rest[top] = False
                p, q = reference[b, t].exp(), tuned[b, t].exp()
                if full:
                    total += float((p * (reference[b, t] - tuned[b, t])).sum())
                    continue
                total += float((p[top] * (reference[b, t, top] - tuned[b, t, top])).sum())
                p_rest, q_rest = float(p[rest].sum()), float(q[rest].sum())
                total += p_rest * (torch.log(torch.tensor(p_rest)) - torch.log(torch.tensor(q_rest))).item()
            else:
                total += -float(tuned[b, t, labels[b, t]])
    return total / count


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_replayed_tokens_start_at_zero_loss_and_pull_back_only_where_the_model_moved(tiny_model_dir, packing):
    model = lora_model(tiny_model_dir)
    user, replay = samples(tiny_model_dir)
    batch = batch_of([replay], packing)
    inputs = {k: v for k, v in model_inputs(batch).items()}
    loss = distilled_loss(Engine(model), inputs, batch["distill"])
    # A fresh LoRA is the base model: nothing to pull back, and no gradient either.
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(p.grad is None or float(p.grad.abs().max()) < 1e-6 for p in model.parameters() if p.requires_grad)

    model.zero_grad()
    perturb(model)
    loss = distilled_loss(Engine(model), inputs, batch["distill"])
    assert float(loss) > 1e-3
    assert float(loss) == pytest.approx(expected_loss(model, tiny_model_dir, batch), rel=1e-4)
    # Two distributions coarsened to K+1 outcomes are never further apart than the whole ones.
    assert float(loss) <= expected_loss(model, tiny_model_dir, batch, full=True) + 1e-6
    loss.backward()
    assert any(float(p.grad.abs().max()) > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_a_mixed_batch_averages_cross_entropy_and_kl_over_all_its_trained_tokens(tiny_model_dir, packing):
    model = lora_model(tiny_model_dir)
    perturb(model, seed=3)
    user, replay = samples(tiny_model_dir)
    batch = batch_of([user, replay], packing)
    assert batch["distill"].mask.sum() == len(replay.distill) == 9  # the replayed answer's tokens, and only those
    loss = distilled_loss(Engine(model), model_inputs(batch), batch["distill"])
    assert float(loss) == pytest.approx(expected_loss(model, tiny_model_dir, batch), rel=1e-4)

    # Without replayed tokens the loss is the model's own cross-entropy (what training uses then).
    plain = batch_of([user], packing)
    assert "distill" not in plain
    inputs = model_inputs(plain)
    with torch.no_grad():
        reference = float(model(**inputs).loss)
    empty = batch_of([user, replay], packing)["distill"]
    shape = plain["labels"].shape
    distill = type(empty)(torch.zeros(shape, dtype=torch.bool), torch.zeros((*shape, K), dtype=torch.long), torch.zeros((*shape, K + 1)))
    assert float(distilled_loss(Engine(model), inputs, distill)) == pytest.approx(reference, rel=1e-5)


def test_prompt_tuning_virtual_tokens_are_left_out_of_the_loss(tiny_model_dir):
    # Prompt tuning puts virtual tokens before the text: the loss must read the text's logits.
    model = lora_model(tiny_model_dir, method="prompt")
    user, replay = samples(tiny_model_dir)
    batch = batch_of([user, replay], packing=False)
    loss = distilled_loss(Engine(model), model_inputs(batch), batch["distill"])
    assert float(loss) == pytest.approx(expected_loss(model, tiny_model_dir, batch), rel=1e-4)


def test_model_inputs_never_pass_the_mask_to_the_model(tiny_model_dir):
    user, replay = samples(tiny_model_dir)
    batch = batch_of([user, replay], packing=True)
    assert "distill" in batch and "distill" not in model_inputs(batch)


def test_full_fine_tuning_distils_too_no_adapter_needed(tiny_model_dir):
    # The targets were recorded before training: a model without any adapter trains toward them.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    user, replay = samples(tiny_model_dir)
    batch = batch_of([replay], packing=False)
    assert float(distilled_loss(Engine(model), model_inputs(batch), batch["distill"])) == pytest.approx(0.0, abs=1e-6)
    perturb(model, seed=5)
    loss = distilled_loss(Engine(model), model_inputs(batch), batch["distill"])
    assert float(loss) > 1e-3 and float(loss) == pytest.approx(expected_loss(model, tiny_model_dir, batch), rel=1e-4)


def test_buckets_hold_the_whole_distribution():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    ids, logp = top_k_distribution(logits, K)
    assert ids.shape == (3, K) and logp.shape == (3, K + 1)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3), atol=1e-5)
    full = F.log_softmax(logits, -1)
    assert torch.equal(ids, full.topk(K).indices)
    assert torch.allclose(on_buckets(full, ids), logp)


def test_a_replay_whose_prompt_must_be_cut_is_dropped_its_answer_cut_with_its_targets():
    prompt, answer = list(range(5, 25)), list(range(50, 90))
    targets = BaseTargets(torch.arange(40 * K).view(40, K), torch.zeros((40, K + 1)))
    # 20 + 40 tokens in 50: the prompt (at most half) stays whole, the answer keeps its first 30 tokens and targets.
    cut = replay_sample(prompt, answer, LengthLimits(50), targets)
    assert cut.input_ids == prompt + answer[:30] and len(cut.distill) == 30 and torch.equal(cut.distill.ids, targets.ids[:30])
    # In 30 tokens the prompt would lose its start: its targets were computed after the whole question.
    assert replay_sample(prompt, answer, LengthLimits(30), targets) is None
    assert replay_sample(prompt, answer, LengthLimits(30)) is not None  # tokens loss: trained as cut, as before


def job(method: dict, loss=None) -> FineTuneJob:
    replay = {"ratio": 0.5} | ({"loss": loss} if loss else {})
    return FineTuneJob.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
        "spec": {"model": {"uri": "m"}, "dataset": {"uri": "d.jsonl"}, "method": method, "retention": {"replay": replay}},
    })  # fmt: skip


@pytest.mark.parametrize(
    "method",
    [{"type": "lora"}, {"type": "lora", "adapterUri": "a"}, {"type": "qlora"}, {"type": "qlora", "adapterUri": "a"},
     {"type": "prompt"}, {"type": "ptuning"}, {"type": "full"}, {"type": "freeze", "freeze": {"lastLayers": 1}}],
)  # fmt: skip
def test_kl_is_the_default_and_accepted_for_every_method(method):
    assert job(method).spec.replay_loss() == "kl"
    assert job(method, loss="tokens").spec.replay_loss() == "tokens"
    assert not [p for p in check_job(job(method, loss="kl"), on_cluster=False) if p.field == "spec.retention.replay.loss"]

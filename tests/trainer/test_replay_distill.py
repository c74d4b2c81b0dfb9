"""spec.retention.replay.loss kl: replayed answers are trained toward the base model's
next-token distributions (KL, the base being the model with its adapter switched off), the
user's data by cross-entropy, all averaged over the micro batch's trained tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kubetune.api.spec import FineTuneJob
from kubetune.api.validation import check_job
from kubetune.data.batching import collate, model_inputs, rows_from_samples
from kubetune.data.tokenize import IGNORE, LengthLimits, Sample
from kubetune.retention.phase import replay_sample
from kubetune.train.loss import distilled_loss


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


def samples(tokenizer_size: int = 512) -> tuple[Sample, Sample]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, tokenizer_size, (2, 14), generator=generator).tolist()
    user = Sample(ids[0], [IGNORE] * 6 + ids[0][6:])  # the user's data: cross-entropy
    replay = replay_sample(ids[1][:5], ids[1][5:], LengthLimits(64), distill=True)  # a replayed answer: KL
    return user, replay


def expected_loss(model, base_dir, batch: dict) -> float:
    """By hand: cross-entropy at user tokens, KL(base || tuned) over the whole vocabulary at
    replayed ones, the base loaded afresh from its folder."""
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
            if batch["distill"][b, t + 1]:
                p = reference[b, t].exp()
                total += float((p * (reference[b, t] - tuned[b, t])).sum())
            else:
                total += -float(tuned[b, t, labels[b, t]])
    return total / count


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_replayed_tokens_start_at_zero_loss_and_pull_back_only_where_the_model_moved(tiny_model_dir, packing):
    model = lora_model(tiny_model_dir)
    user, replay = samples()
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
    loss.backward()
    assert any(float(p.grad.abs().max()) > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_a_mixed_batch_averages_cross_entropy_and_kl_over_all_its_trained_tokens(tiny_model_dir, packing):
    model = lora_model(tiny_model_dir)
    perturb(model, seed=3)
    user, replay = samples()
    batch = batch_of([user, replay], packing)
    assert batch["distill"].sum() == len(replay)  # the replayed sample's tokens, and only those
    loss = distilled_loss(Engine(model), model_inputs(batch), batch["distill"])
    assert float(loss) == pytest.approx(expected_loss(model, tiny_model_dir, batch), rel=1e-4)

    # Without replayed tokens the loss is the model's own cross-entropy (what training uses then).
    plain = batch_of([user], packing)
    assert "distill" not in plain
    inputs = model_inputs(plain)
    with torch.no_grad():
        reference = float(model(**inputs).loss)
    distill = torch.zeros_like(plain["labels"], dtype=torch.bool)
    assert float(distilled_loss(Engine(model), inputs, distill)) == pytest.approx(reference, rel=1e-5)


def test_prompt_tuning_virtual_tokens_are_left_out_of_the_loss(tiny_model_dir):
    # Prompt tuning puts virtual tokens before the text: the loss must read the text's logits.
    model = lora_model(tiny_model_dir, method="prompt")
    user, replay = samples()
    batch = batch_of([user, replay], packing=False)
    loss = distilled_loss(Engine(model), model_inputs(batch), batch["distill"])
    assert float(loss) == pytest.approx(expected_loss(model, tiny_model_dir, batch), rel=1e-4)


def test_model_inputs_never_pass_the_mask_to_the_model(tiny_model_dir):
    user, replay = samples()
    batch = batch_of([user, replay], packing=True)
    assert "distill" in batch and "distill" not in model_inputs(batch)


def job(method: dict, loss=None) -> FineTuneJob:
    replay = {"ratio": 0.5} | ({"loss": loss} if loss else {})
    return FineTuneJob.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
        "spec": {"model": {"uri": "m"}, "dataset": {"uri": "d.jsonl"}, "method": method, "retention": {"replay": replay}},
    })  # fmt: skip


@pytest.mark.parametrize(
    "method,expected",
    [
        ({"type": "lora"}, "kl"),
        ({"type": "lora", "adapterUri": "a"}, "kl"),  # the adapter is merged into the base first
        ({"type": "qlora"}, "kl"),
        ({"type": "qlora", "adapterUri": "a"}, "tokens"),  # trained on, so switching it off is not the model that answered
        ({"type": "prompt"}, "kl"),
        ({"type": "ptuning"}, "kl"),
        ({"type": "full"}, "tokens"),
        ({"type": "freeze", "freeze": {"lastLayers": 1}}, "tokens"),
    ],
)
def test_the_default_is_kl_wherever_switching_the_adapter_off_gives_back_the_base(method, expected):
    assert job(method).spec.replay_loss() == expected
    assert job(method, loss="tokens").spec.replay_loss() == "tokens"


@pytest.mark.parametrize("method", [{"type": "full"}, {"type": "freeze", "freeze": {"lastLayers": 1}}, {"type": "qlora", "adapterUri": "a"}])
def test_asking_for_kl_where_there_is_no_base_to_switch_back_to_is_refused_with_the_field(method):
    problems = [p for p in check_job(job(method, loss="kl"), on_cluster=False) if p.field == "spec.retention.replay.loss"]
    assert len(problems) == 1 and "use tokens" in problems[0].message, problems
    assert not [p for p in check_job(job({"type": "lora"}, loss="kl"), on_cluster=False) if p.field == "spec.retention.replay.loss"]

"""Each method: loss falls over a few steps and exactly the intended parameters change."""

from __future__ import annotations

import pytest
import torch

from kubetune.api.spec import FineTuneJobSpec
from kubetune.data.batching import Row, collate, model_inputs
from kubetune.data.tokenize import LengthLimits, tokenize_messages
from kubetune.model.loader import load_model
from kubetune.model.methods import MethodError, apply_method, check_method_runtime, count_parameters

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "hello world"}],
]


def make_spec(method: dict, **training) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {"model": {"uri": "m"}, "dataset": {"uri": "d.jsonl"}, "method": method, "training": training}
    )


def batch(tokenizer):
    rows = [Row(s.input_ids, s.labels) for s, _ in (tokenize_messages(tokenizer, m, LengthLimits(64)) for m in MESSAGES)]
    return model_inputs(collate(rows, tokenizer.pad_token_id))


def train_steps(model, inputs, steps=10, lr=3e-2):
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    return losses


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


METHODS = [
    # (method block, predicate on parameter names that must train)
    ({"type": "full"}, lambda n: True),
    ({"type": "freeze", "freeze": {"lastLayers": 1}}, lambda n: "layers.1." in n),
    ({"type": "freeze", "freeze": {"trainableModules": ["layers.0.mlp.", "lm_head"]}}, lambda n: "layers.0.mlp." in n or "lm_head" in n),
    ({"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}},
     lambda n: "lora_" in n and ("q_proj" in n or "v_proj" in n)),
    ({"type": "lora", "lora": {"r": 4, "targetModules": ["all-linear"]}}, lambda n: "lora_" in n),
    ({"type": "ptuning", "ptuning": {"preSeqLen": 4}}, lambda n: "prompt_encoder" in n),
    ({"type": "ptuning", "ptuning": {"preSeqLen": 4, "prefixProjection": True, "projectionHiddenSize": 32}}, lambda n: "prompt_encoder" in n),
    ({"type": "prompt", "prompt": {"virtualTokens": 4, "initText": "answer the question"}}, lambda n: "prompt_encoder" in n),
]


@pytest.mark.parametrize("method,should_train", METHODS, ids=lambda v: str(v)[:60] if isinstance(v, dict) else "")
def test_method_trains_exactly_its_parameters(tiny_model_dir, tiny_tokenizer, method, should_train):
    spec = make_spec(method, gradientCheckpointing=method["type"] in ("lora", "full", "prompt"))
    check_method_runtime(spec)
    model = apply_method(load_model(tiny_model_dir, spec, "fp32"), spec, tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in model.named_parameters() if should_train(n)}
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) and n_trainable <= n_total
    before = snapshot(model)
    losses = train_steps(model, batch(tiny_tokenizer))
    assert losses[-1] < losses[0] - 0.1, losses
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable  # every trainable parameter moved; every frozen one is bit-identical


def test_lora_rejects_unknown_target_modules(tiny_model_dir):
    spec = make_spec({"type": "lora", "lora": {"targetModules": ["query_key_value"]}})
    with pytest.raises(MethodError) as err:
        apply_method(load_model(tiny_model_dir, spec, "fp32"), spec, tiny_model_dir)
    assert str(err.value).startswith("method.lora.targetModules: Target modules {'query_key_value'} not found in the base model.")


def test_freeze_patterns_must_match(tiny_model_dir):
    spec = make_spec({"type": "freeze", "freeze": {"trainableModules": ["layers.27."]}})
    with pytest.raises(MethodError) as err:
        apply_method(load_model(tiny_model_dir, spec, "fp32"), spec, tiny_model_dir)
    assert str(err.value) == "method.freeze.trainableModules: 'layers.27.' matches no parameter; names look like 'model.layers.1.self_attn.q_proj.weight'"
    spec = make_spec({"type": "freeze", "freeze": {"lastLayers": 3}})
    with pytest.raises(MethodError, match="^method.freeze.lastLayers is 3 but the model has only 2 layers$"):
        apply_method(load_model(tiny_model_dir, spec, "fp32"), spec, tiny_model_dir)


def test_continue_from_adapter_merges_it_then_trains_a_new_lora(tiny_model_dir, tiny_tokenizer, tmp_path):
    spec = make_spec({"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}})
    first = apply_method(load_model(tiny_model_dir, spec, "fp32"), spec, tiny_model_dir)
    inputs = batch(tiny_tokenizer)
    train_steps(first, inputs)
    first.save_pretrained(tmp_path / "adapter")
    first.eval()
    with torch.no_grad():
        expected = first(**inputs).logits
    cont = make_spec({"type": "lora", "lora": {"r": 4, "targetModules": ["all-linear"]}, "adapterUri": "a"})
    model = apply_method(load_model(tiny_model_dir, cont, "fp32"), cont, tiny_model_dir, adapter_dir=tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        # The new LoRA starts at zero, so the model equals base + first adapter, merged.
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    merged_q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    original_q = load_model(tiny_model_dir, cont, "fp32").model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(merged_q, original_q)


REFUSED = [
    ({"type": "qlora"}, {},
     "method.type qlora quantizes the base model with bitsandbytes, which needs a CUDA GPU; this machine has none. "
     "Use method.type lora to train the same adapters unquantized."),
    ({"type": "ptuning"}, {"gradientCheckpointing": True},
     "method.type ptuning cannot be combined with training.gradientCheckpointing: the prefix is fed to every layer as a "
     "key/value cache, which checkpointed layers cannot recompute; set training.gradientCheckpointing: false (the prefix "
     "itself needs little memory)"),
    ({"type": "prompt"}, {"packing": True},
     "method.type prompt cannot be combined with training.packing: virtual tokens would be shared by every sample in a "
     "packed row; set training.packing: false"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the qlora refusal is for machines without CUDA")
@pytest.mark.parametrize("method,training,message", REFUSED)
def test_impossible_combinations_are_refused_before_loading(method, training, message):
    with pytest.raises(MethodError) as err:
        check_method_runtime(make_spec(method, **training))
    assert str(err.value) == message

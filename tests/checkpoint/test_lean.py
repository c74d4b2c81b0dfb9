"""Lean checkpoints: with frozen parameters (LoRA, prompt tuning, ...) a checkpoint holds the
trainable parameters, their optimizer state and the run state only, at every ZeRO stage, and
a fresh engine built from the base model resumes from it bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch

from kubetune.artifacts.checkpoint import CheckpointManager, RetryPolicy, TrainableMismatch

FP32_COPIES = 4  # the weight, the optimizer's fp32 master copy, Adam's two moments


def manager(uri: str, tmp_path, node: str) -> CheckpointManager:
    return CheckpointManager(uri, keep=2, local_dir=tmp_path / node, rank=0, world_size=1, retry=RetryPolicy(attempts=2, first_delay=0.1))


def stored_tensors(obj, path: str = ""):
    """(path, tensor) of every tensor in a loaded checkpoint file."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from stored_tensors(value, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from stored_tensors(value, f"{path}/{i}")


def tensor_bytes(folder) -> tuple[int, list[str]]:
    """Bytes of the distinct storages of the non-scalar tensors in DeepSpeed's files of a
    checkpoint, and every tensor's path. Left out, as run state whatever the model: scalars
    (optimizer step counts) and the manager's rng/ files (each rank's generator states)."""
    storages, paths = {}, []
    for file in sorted(folder.glob("*.pt")):
        for path, tensor in stored_tensors(torch.load(file, map_location="cpu", weights_only=False), file.name):
            paths.append(path)
            if tensor.dim() == 0:
                continue
            storage = tensor.untyped_storage()
            storages[(file.name, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values()), paths


def prompt_tuning():
    from peft import PromptTuningConfig, TaskType

    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)


CASES = [(0, None), (1, None), (2, None), (3, None), (2, prompt_tuning)]


@pytest.mark.parametrize("stage,peft", CASES, ids=[f"zero{s}-{'prompt' if p else 'lora'}" for s, p in CASES])
def test_checkpoint_holds_only_trainable_state_and_resumes_exactly(make_engine, train, snapshot, tmp_path, stage, peft):
    uri = f"file://{tmp_path}/ck"
    engine = make_engine(stage=stage, peft_config=peft() if peft else None)
    trainable = sum(getattr(p, "ds_numel", 0) or p.numel() for p in engine.module.parameters() if p.requires_grad)
    frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
    base_bytes = sum((getattr(p, "ds_numel", 0) or p.numel()) * 4 for n, p in engine.module.named_parameters() if n in frozen)
    train(engine, 2)
    name = manager(uri, tmp_path, "node-a").save(engine, 2, {"step": 2})
    train(engine, 1)  # data and dropout come from the global RNG
    after_three = snapshot(engine)

    folder = tmp_path / "ck" / name
    assert json.loads((folder / "manifest.json").read_text())["frozen_excluded"] is True
    held, paths = tensor_bytes(folder)
    # At most four fp32 copies of each trainable parameter, and no frozen weight by name.
    assert held <= FP32_COPIES * 4 * trainable < base_bytes, (held, trainable, base_bytes)
    assert not [p for p in paths if any(p.endswith("/" + n) for n in frozen)]
    assert not [p for p in paths if "frozen_param" in p]

    # A fresh engine (other seed: other trainable weights and RNG) on a fresh "node": its base
    # weights come from the model folder, the rest from the checkpoint. The next step is
    # bit-identical to the one the saving engine took.
    fresh = make_engine(stage=stage, seed=99, peft_config=peft() if peft else None)
    restarted = manager(uri, tmp_path, "node-b")
    assert restarted.load(fresh, restarted.latest()) == {"step": 2}
    train(fresh, 1)
    assert all(torch.equal(after_three[k], v) for k, v in snapshot(fresh).items())


def test_a_checkpoint_of_other_trainable_parameters_is_refused(make_engine, train, tmp_path):
    from peft import LoraConfig

    uri = f"file://{tmp_path}/ck"
    engine = make_engine(stage=2)
    train(engine, 1)
    manager(uri, tmp_path, "node-a").save(engine, 1, {"step": 1})
    other = make_engine(stage=2, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]))
    restarted = manager(uri, tmp_path, "node-b")
    with pytest.raises(TrainableMismatch, match=r"step-000000001 trains other parameters than this job \(spec.method changed"):
        restarted.load(other, restarted.latest())
    assert not (tmp_path / "node-b").exists()  # refused before downloading anything

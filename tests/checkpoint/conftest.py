"""Fixtures for checkpoint tests: an in-process DeepSpeed world of one rank, tiny engines."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def one_rank_world():
    """torch.distributed with world size 1 in this process (gloo on 127.0.0.1) for the whole
    session: DeepSpeed caches its process groups, so a group cannot be replaced mid-session."""
    import torch.distributed as dist

    from kubetune.artifacts.net import free_port

    saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "LOCAL_RANK")}
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0")  # DeepSpeed insists on LOCAL_RANK
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if owner and dist.is_initialized():  # an in-process trainer run may have ended it already
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def make_engine(one_rank_world, tiny_model_dir):
    """make_engine(stage=0, lora=True, seed=0, peft_config=None, **zero) -> a DeepSpeed engine
    over the tiny model (LoRA, or the given peft config); `zero` adds zero_optimization settings."""

    def make(stage: int = 0, lora: bool = True, seed: int = 0, peft_config=None, **zero):
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if lora or peft_config is not None:
            from peft import LoraConfig, get_peft_model

            lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            model = get_peft_model(model, peft_config or lora_config)
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, **zero},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": 20, "warmup_max_lr": 1e-2}},
            "steps_per_print": 10**9,
        }
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
        return engine

    return make


@pytest.fixture
def train():
    """train(engine, n): n optimizer steps on random tokens from the global torch RNG."""

    def run(engine, n: int) -> None:
        import torch

        for _ in range(n):
            ids = torch.randint(0, engine.module.config.vocab_size, (2, 8))
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()

    return run


def trainable_snapshot(engine) -> dict:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


@pytest.fixture
def snapshot():
    """snapshot(engine): copies of the trainable parameters by name."""
    return trainable_snapshot

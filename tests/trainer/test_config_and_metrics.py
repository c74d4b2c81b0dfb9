"""Pure parts of the trainer: DeepSpeed config from the spec (LR schedule: test_schedule.py; generation metrics: test_evaluate.py)."""

from __future__ import annotations

from kubetune.api.spec import FineTuneJobSpec
from kubetune.train.deepspeed_config import build_deepspeed_config, uses_client_optimizer


def spec(**parts) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({"model": {"uri": "m"}, "dataset": {"uri": "d"}, **parts})


def test_zero2_config_from_high_level_fields():
    s = spec(training={"microBatchSize": 2, "gradientAccumulationSteps": 4, "maxGradNorm": 0.5}, distributed={"zero": {"stage": 2}})
    config = build_deepspeed_config(s, world_size=8, precision="bf16", on_gpu=True)
    assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True}
    assert config["bf16"] == {"enabled": True} and config["fp16"]["enabled"] is False
    assert uses_client_optimizer(config)


def test_zero3_offload_all_on_gpu_lets_deepspeed_build_cpu_adam():
    s = spec(training={"learningRate": 2e-5, "weightDecay": 0.1}, distributed={"zero": {"stage": 3, "offload": "all"}})
    config = build_deepspeed_config(s, world_size=4, precision="fp16", on_gpu=True)
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["optimizer"]["params"]["lr"] == 2e-5 and config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["fp16"]["enabled"] is True and not uses_client_optimizer(config)
    cpu = build_deepspeed_config(s, world_size=2, precision="fp32", on_gpu=False)
    assert uses_client_optimizer(cpu) and cpu["zero_force_ds_cpu_optimizer"] is False
    assert cpu["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}


def test_raw_override_merges_key_by_key():
    s = spec(distributed={"zero": {"stage": 3}, "deepspeedConfig": {"zero_optimization": {"stage3_max_live_parameters": 1000}, "gradient_clipping": 0.0}})
    config = build_deepspeed_config(s, world_size=1, precision="fp32", on_gpu=False)
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["stage3_max_live_parameters"] == 1000
    assert config["gradient_clipping"] == 0.0

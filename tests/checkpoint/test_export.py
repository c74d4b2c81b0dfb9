"""Export and merge with a real in-process DeepSpeed engine and the tiny model; outputs to
file:// and to a real SeaweedFS bucket. (ZeRO-3 with 2 ranks: test_resume.py.)"""

from __future__ import annotations

import uuid

import pytest
import torch

from kubetune.export import _check_not_empty, copy_non_weight_files, merge_adapter, save_trained
from kubetune.layout import job_layout
from kubetune.spec import parse_job
from kubetune.storage import open_store


def make_job(tiny_model_dir, method: str, output: str):
    return parse_job(
        {
            "metadata": {"name": "export"},
            "spec": {"model": {"uri": str(tiny_model_dir)}, "dataset": {"uri": "d.jsonl"}, "method": {"type": method}, "output": {"uri": output}},
        }
    )


def test_non_weight_files_are_copied_and_never_overwrite(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (src / ".cache").mkdir()
    for name in ["config.json", "tokenizer.json", "chat_template.jinja", "LICENSE", "sub/notes.txt", ".cache/x",
                 "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "m.gguf", ".kubetune-complete"]:  # fmt: skip
        (src / name).write_text(name)
    dst.mkdir()
    (dst / "config.json").write_text("mine")
    copied = copy_non_weight_files(src, dst)
    assert sorted(copied) == ["LICENSE", "chat_template.jinja", "sub/notes.txt", "tokenizer.json"]
    assert (dst / "config.json").read_text() == "mine"


def test_merged_lora_gives_the_peft_logits(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{{ messages[0]['content'] }}"  # a run-specific template wins over the base's
    tokenizer.save_pretrained(tmp_path / "adapter")

    out = merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter").eval()
    ids = torch.tensor([[5, 17, 99, 3, 250, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert AutoTokenizer.from_pretrained(out).chat_template == "{{ messages[0]['content'] }}"


def test_merge_refuses_a_folder_that_is_not_an_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        merge_adapter(tiny_model_dir, tiny_model_dir, tmp_path / "out")


def test_full_export_loads_with_plain_from_pretrained(make_engine, train, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = make_engine(stage=2, lora=False)
    train(engine, 2)
    job = make_job(tiny_model_dir, "full", str(tmp_path / "out"))
    outputs = save_trained(engine, engine.module, AutoTokenizer.from_pretrained(tiny_model_dir), job, job_layout(job), tiny_model_dir)

    assert outputs == {"adapter": None, "model": f"file://{tmp_path / 'out' / 'model'}"}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    trained = engine.module.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in exported.state_dict().items())
    assert AutoTokenizer.from_pretrained(tmp_path / "out" / "model").chat_template


def test_adapter_export_to_s3_replaces_an_earlier_export(make_engine, train, tiny_model_dir, s3_env, tmp_path):
    from transformers import AutoTokenizer

    output = f"s3://outputs/{uuid.uuid4().hex[:8]}"
    store = open_store(output + "/adapter")
    store.put_bytes("stale-from-an-earlier-run.bin", b"old")
    engine = make_engine(stage=2, lora=True)
    train(engine, 1)
    job = make_job(tiny_model_dir, "lora", output)

    outputs = save_trained(engine, engine.module, AutoTokenizer.from_pretrained(tiny_model_dir), job, job_layout(job), tiny_model_dir)

    assert outputs == {"adapter": f"{output}/adapter", "model": None}
    keys = {o.key for o in store.list()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= keys
    assert "stale-from-an-earlier-run.bin" not in keys and "model.safetensors" not in keys


def test_an_ungathered_empty_tensor_is_never_published(tmp_path):
    from safetensors.torch import save_file

    save_file({"base_model.model.q_proj.lora_A.weight": torch.empty(0)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="empty tensor base_model.model.q_proj.lora_A.weight"):
        _check_not_empty(tmp_path)


def test_full_export_under_zero3_gathers_the_partitioned_weights(make_engine, train, tiny_model_dir, tmp_path):
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = make_engine(stage=3, lora=False, stage3_param_persistence_threshold=0)  # partition even tiny tensors
    train(engine, 1)
    params = dict(engine.module.named_parameters())
    assert all(p.numel() == 0 for p in params.values())  # partitioned: state_dict() alone would be empty
    job = make_job(tiny_model_dir, "full", str(tmp_path / "out"))

    save_trained(engine, engine.module, AutoTokenizer.from_pretrained(tiny_model_dir), job, job_layout(job), tiny_model_dir)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").state_dict()
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, param in params.items():
            assert torch.equal(exported[name], param.detach()), name


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompt_learning_adapters_export_gathered_under_zero3(make_engine, train, tiny_model_dir, tmp_path, method):
    import deepspeed
    from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = (PromptTuningConfig if method == "prompt" else PrefixTuningConfig)(task_type="CAUSAL_LM", num_virtual_tokens=4)
    engine = make_engine(stage=3, peft_config=config, stage3_param_persistence_threshold=0)
    train(engine, 2)
    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    assert trainable and all(p.numel() == 0 for p in trainable.values())
    job = make_job(tiny_model_dir, method, str(tmp_path / "out"))

    save_trained(engine, engine.module, AutoTokenizer.from_pretrained(tiny_model_dir), job, job_layout(job), tiny_model_dir)

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "out" / "adapter")
    with deepspeed.zero.GatheredParameters(list(trainable.values())):
        for name, param in trainable.items():
            assert torch.equal(dict(loaded.named_parameters())[name], param.detach()), name

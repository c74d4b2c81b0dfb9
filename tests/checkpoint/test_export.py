"""Export and merge with a real in-process DeepSpeed engine and the tiny model; outputs to
file:// and to a real SeaweedFS bucket. (ZeRO-3 with 2 ranks: test_resume.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch

from kubetune.api.layout import job_layout
from kubetune.api.spec import parse_job
from kubetune.artifacts.export_format import EXPORT_MANIFEST, IncompleteExport, check_export, publish_dir
from kubetune.artifacts.storage import fetch, open_store, sha256_file
from kubetune.train.export import _check_not_empty, copy_non_weight_files, merge_adapter, run_merge, save_trained


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


# Publishes a folder, but the process is SIGKILLed right after its first file is uploaded.
DIE_PUBLISHING = """
import os, signal, sys
from kubetune.artifacts import storage
from kubetune.artifacts.export_format import publish_dir
from kubetune.api.uri import parse_uri

def put_then_die(self, local, key, _put=storage.S3Store.put_file):
    _put(self, local, key)
    os.kill(os.getpid(), signal.SIGKILL)

storage.S3Store.put_file = put_then_die
publish_dir(sys.argv[1], parse_uri(sys.argv[2]))
"""


def test_export_manifest_is_written_last_and_checked_by_readers(make_engine, train, tiny_model_dir, s3_env, tmp_path):
    from transformers import AutoTokenizer

    output = f"s3://outputs/{uuid.uuid4().hex[:8]}"
    engine = make_engine(stage=2, lora=True)
    train(engine, 1)
    job = make_job(tiny_model_dir, "lora", output)
    save_trained(engine, engine.module, AutoTokenizer.from_pretrained(tiny_model_dir), job, job_layout(job), tiny_model_dir)

    copy = fetch(f"{output}/adapter", tmp_path / "first")
    manifest = json.loads((copy / EXPORT_MANIFEST).read_text())
    assert manifest["complete"] is True and manifest["format"] == 1
    listed = {f["path"]: f for f in manifest["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(listed) and EXPORT_MANIFEST not in listed
    assert all(listed[p]["sha256"] == sha256_file(copy / p) and listed[p]["size"] == (copy / p).stat().st_size for p in listed)
    assert check_export(copy) is True
    assert check_export(tiny_model_dir) is False  # not an export (a base model): used as it is

    # A file changed after the export no longer matches its manifest.
    weights = copy / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(IncompleteExport, match="adapter_model.safetensors does not match its SHA-256"):
        check_export(copy)


def test_a_reexport_killed_halfway_is_never_used_as_complete(make_engine, train, tiny_model_dir, s3_env, tmp_path):
    from transformers import AutoTokenizer

    output = f"s3://outputs/{uuid.uuid4().hex[:8]}"
    engine = make_engine(stage=2, lora=True)
    train(engine, 1)
    job = parse_job({"metadata": {"name": "export"}, "spec": {"model": {"uri": str(tiny_model_dir)}, "dataset": {"uri": "d.jsonl"},
                     "method": {"type": "lora"}, "output": {"uri": output, "merge": True}}})  # fmt: skip
    layout = job_layout(job)
    save_trained(engine, engine.module, AutoTokenizer.from_pretrained(tiny_model_dir), job, layout, tiny_model_dir)
    old = fetch(layout.adapter, tmp_path / "old")

    # A second export of the same adapter (same names and sizes, other weights) dies after
    # uploading its first file: old and new files are now mixed in storage.
    new = tmp_path / "new"
    new.mkdir()
    for path in old.iterdir():
        if path.name != EXPORT_MANIFEST:
            data = bytearray(path.read_bytes())
            if path.name == "adapter_model.safetensors":
                data[-4:] = b"\x00\x00\x80\x3f"  # the last float becomes 1.0: same size
            (new / path.name).write_bytes(bytes(data))
    died = subprocess.run([sys.executable, "-c", DIE_PUBLISHING, str(new), str(layout.adapter)], env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert died.returncode == -9, died.stderr[-2000:]

    half = fetch(layout.adapter, tmp_path / "half")
    with pytest.raises(IncompleteExport, match="is an unfinished export"):
        check_export(half, str(layout.adapter))
    with pytest.raises(IncompleteExport, match="is an unfinished export"):
        run_merge(job, cache_dir=tmp_path / "cache")  # the merge step refuses it
    assert not open_store(layout.model).list()  # nothing merged, nothing served from it
    # Nor is it served, or trained on as a base model.
    from kubetune.api.spec import ModelSpec
    from kubetune.artifacts.model_source import materialize_model
    from kubetune.serve.loader import load_model

    with pytest.raises(IncompleteExport, match="is an unfinished export"):
        load_model(str(layout.adapter), base_model=str(tiny_model_dir), cache_dir=tmp_path / "serve-cache")
    with pytest.raises(ValueError, match="is an unfinished export"):
        materialize_model(ModelSpec(uri=str(layout.adapter)), tmp_path / "cache")

    # Exporting again completes it, with the new files only.
    publish_dir(new, layout.adapter)
    again = fetch(layout.adapter, tmp_path / "again")
    assert check_export(again) is True
    assert (again / "adapter_model.safetensors").read_bytes() == (new / "adapter_model.safetensors").read_bytes()
    assert run_merge(job, cache_dir=tmp_path / "cache")["model"] == str(layout.model)

"""What `kubetune-serve --model` can point at: an adapter on its base (LoRA merged in memory,
prompt tuning kept wrapped), and the real command serving a model from S3 (SeaweedFS) with a
job's defaults and a bearer token."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import chat_ids, openai_client, reference_ids

from kubetune.artifacts.net import free_port
from kubetune.serve.engine import Engine
from kubetune.serve.loader import load_model
from kubetune.serve.sampling import SamplingParams


def _adapter(tiny_model_dir, dest, config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, config)
    model.save_pretrained(dest)
    return model.eval()


def test_lora_adapter_is_applied_on_its_base(tiny_model_dir, tiny, tmp_path):
    from peft import LoraConfig

    peft_model = _adapter(tiny_model_dir, tmp_path / "adapter", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    declared = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.samefile(declared, tiny_model_dir)
    loaded = load_model(str(tmp_path / "adapter"), cache_dir=tmp_path / "cache")
    assert loaded.base_path is not None and os.path.samefile(loaded.base_path, tiny_model_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    assert engine.batched  # LoRA was merged: the fast path serves it
    ids = chat_ids(loaded.tokenizer, [{"role": "user", "content": "What is LoRA?"}])
    engine.start()
    try:
        out = engine.generate(ids, SamplingParams(max_tokens=16))[0].token_ids
    finally:
        engine.stop()
    assert out == reference_ids(peft_model, ids, 16, engine.eos_ids)
    assert out != reference_ids(tiny.model, ids, 16, engine.eos_ids)  # the adapter changes the answer

    # A base the adapter names but this server cannot reach: --base-model points elsewhere.
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    config_path.write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="--base-model"):
        load_model(str(tmp_path / "adapter"), cache_dir=tmp_path / "cache")
    again = load_model(str(tmp_path / "adapter"), base_model=str(tiny_model_dir), cache_dir=tmp_path / "cache")
    assert torch.equal(again.model.model.layers[0].self_attn.q_proj.weight, loaded.model.model.layers[0].self_attn.q_proj.weight)


def test_prompt_tuning_adapter_is_served_one_request_at_a_time(tiny_model_dir, tmp_path):
    from peft import PromptTuningConfig, TaskType

    peft_model = _adapter(tiny_model_dir, tmp_path / "prompt", PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    loaded = load_model(str(tmp_path / "prompt"), cache_dir=tmp_path / "cache")
    engine = Engine(loaded.model, loaded.tokenizer)
    assert not engine.batched
    ids = loaded.tokenizer.encode("The quick brown fox")
    engine.start()
    try:
        out = engine.generate(ids, SamplingParams(max_tokens=12))[0].token_ids
    finally:
        engine.stop()
    assert out == reference_ids(peft_model, ids, 12, engine.eos_ids)


def test_every_file_of_a_served_export_is_hashed_once_per_load(tiny_model_dir, tmp_path, monkeypatch):
    """A merged model is checked against its export manifest once at start (not again by the
    model cache); an exported adapter on an exported base: each of their files once too."""
    from peft import LoraConfig

    from kubetune.api.uri import parse_uri
    from kubetune.artifacts import export_format

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    export_format.publish_dir(tiny_model_dir, parse_uri(str(merged)))
    _adapter(tiny_model_dir, tmp_path / "adapter-files", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    export_format.publish_dir(tmp_path / "adapter-files", parse_uri(str(adapter)))
    hashed: collections.Counter = collections.Counter()
    sha256_file = export_format.sha256_file

    def counted(path, *args, **kwargs):
        hashed[Path(path).resolve()] += 1
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(export_format, "sha256_file", counted)

    def each_file_once(*folders: Path) -> collections.Counter:
        manifests = [(folder, json.loads((folder / export_format.EXPORT_MANIFEST).read_text())["files"]) for folder in folders]
        return collections.Counter({(folder / f["path"]).resolve(): 1 for folder, files in manifests for f in files})

    load_model(str(merged), cache_dir=tmp_path / "cache")
    assert any(path.name == "model.safetensors" for path in hashed)
    assert hashed == each_file_once(merged)

    hashed.clear()
    load_model(str(adapter), base_model=str(merged), cache_dir=tmp_path / "cache")
    assert hashed == each_file_once(adapter, merged)


def _serve(args, env, log):
    return subprocess.Popen([sys.executable, "-m", "kubetune.serve.server", *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_command_serves_a_model_from_s3_with_job_defaults_and_token(tiny_model_dir, tiny, seaweed, tmp_path):
    from kubetune.artifacts.storage import open_store

    env = {**os.environ, **seaweed.env, "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in seaweed.env}
    os.environ.update(seaweed.env)
    try:
        open_store("s3://models/served/tiny").put_dir(tiny_model_dir, "")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    job = tmp_path / "job.yaml"
    job.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: qa-bot}\n"
        "spec:\n  model: {uri: s3://models/base}\n  dataset: {uri: s3://data/qa.jsonl}\n"
        f"  storage: {{endpoint: '{seaweed.endpoint}'}}\n"
        "  serving: {enabled: true, generation: {temperature: 0, maxTokens: 9}}\n"
    )
    (tmp_path / "token").write_text("tok-123\n")
    port = free_port()
    args = ["--model", "s3://models/served/tiny", "--job", str(job), "--token-file", str(tmp_path / "token"), "--port", str(port),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    with open(tmp_path / "serve.log", "wb") as log:
        proc = _serve(args, env, log)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if httpx.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            client = openai_client(url, api_key="tok-123")
            assert [m.id for m in client.models.list().data] == ["qa-bot"]
            messages = [{"role": "user", "content": "Hello?"}]
            answer = client.chat.completions.create(model="qa-bot", messages=messages)
            expected = reference_ids(tiny.model, chat_ids(tiny.tokenizer, messages), 9, {tiny.tokenizer.eos_token_id})
            assert answer.choices[0].message.content == tiny.tokenizer.decode(expected, skip_special_tokens=True)
            assert answer.usage.completion_tokens == len(expected)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=60)
    output = (tmp_path / "serve.log").read_text()
    # uvicorn shuts down cleanly on SIGTERM, then re-raises the signal it captured.
    assert code in (0, -signal.SIGTERM) and "Finished server process" in output, output


def test_command_exits_with_invalid_input_when_the_model_is_missing(tmp_path):
    with open(tmp_path / "serve.log", "wb") as log:
        proc = _serve(["--model", str(tmp_path / "nothing"), "--port", str(free_port())], {**os.environ, "OMP_NUM_THREADS": "1"}, log)
        code = proc.wait(timeout=180)
    output = (tmp_path / "serve.log").read_text()
    assert code == 64, output
    assert "nothing does not exist" in output

"""kubetune-train under torchrun (2 ranks, ZeRO-3, LoRA with dropout, checkpoints in real
SeaweedFS S3) crashed, preempted and restarted on fresh "nodes" must end with exactly the
adapter of an uninterrupted run (bit-identical: torch.equal on every tensor), and the merged
model must give the PEFT model's logits.

One chain of runs shows each promise once:
  run 1  rank 1 is SIGKILLed in the middle of uploading checkpoint step 4 (in the background,
         while training goes on; torchrun takes the other rank down): step-000000004 is left
         half-written, without manifest;
  run 2  resumes from step 2, skipping the half checkpoint with a log line saying why; gets
         SIGTERM once step 5 is reported: all ranks finish the step they are in (5, or a
         later one if they were already past the agreement point), commit it, exit 75;
  run 3  resumes from that step and finishes; its adapter equals the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from kubetune.api import exitcodes
from kubetune.api.uri import parse_uri
from kubetune.artifacts.net import free_port
from kubetune.artifacts.storage import S3Store

HERE = Path(__file__).resolve().parent
STEPS = 8
RUN_TIMEOUT = 400

pytestmark = pytest.mark.slow


def write_job(folder: Path, model: Path, ckpt: str, endpoint: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(4) for b in range(5)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "resume-test"},
        "spec": {
            "model": {"uri": str(model)},
            "dataset": {"uri": "data.jsonl", "format": "prompt_response"},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]}},
            "training": {"maxSteps": STEPS, "learningRate": 1e-2, "microBatchSize": 2, "maxLength": 48, "logEverySteps": 1, "seed": 3, "precision": "fp32"},
            "distributed": {"nodes": 1, "gpusPerNode": 2, "zero": {"stage": 3}},
            "checkpoint": {"uri": ckpt, "everySteps": 2, "keep": 2},
            "storage": {"endpoint": endpoint},
            "output": {"uri": "out", "merge": True},
        },
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def launch(job: Path, env: dict, node: Path, *program: str) -> subprocess.Popen:
    env = {**env, "KUBETUNE_CHECKPOINT_LOCAL_DIR": str(node)}  # a fresh local disk per restart
    program = program or ("-m", "kubetune.train.main")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), *program, "--job", str(job)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def collect(proc: subprocess.Popen, on_event=None) -> tuple[list[dict], str, int]:
    events = []
    for line in proc.stdout:
        if line.startswith("{"):
            events.append(json.loads(line))
            if on_event:
                on_event(events[-1])
    stderr = proc.stderr.read()
    return events, stderr, proc.wait(timeout=RUN_TIMEOUT)


def s3(uri: str, seaweed) -> S3Store:
    return S3Store(parse_uri(uri), client=seaweed.client())


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, seaweed, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    env = {**os.environ, **seaweed.env, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_CACHE_DIR": str(base / "cache")}
    # Uninterrupted reference.
    reference_job = write_job(base / "reference", tiny_model_dir, f"s3://checkpoints/{uuid.uuid4().hex[:8]}", seaweed.endpoint)
    reference = collect(launch(reference_job, env, base / "reference-node"))
    assert reference[2] == 0, reference[1][-3000:]

    ckpt = f"s3://checkpoints/{uuid.uuid4().hex[:8]}"
    job = write_job(base / "chain", tiny_model_dir, ckpt, seaweed.endpoint)
    crashed = collect(launch(job, env, base / "node-1", str(HERE / "die_uploading.py"), "4"))
    half = sorted(o.key for o in s3(ckpt, seaweed).list("step-000000004/"))

    def preempt_after_step_5(event):
        if event["event"] == "step" and event["step"] == 5:
            for worker in psutil.Process(preempted_proc.pid).children():
                worker.send_signal(signal.SIGTERM)  # what each container process gets on eviction

    preempted_proc = launch(job, env, base / "node-2")
    preempted = collect(preempted_proc, preempt_after_step_5)
    preempted_at = next((e["step"] for e in preempted[0] if e["event"] == "preempted"), None)
    assert preempted_at is not None and preempted_at < STEPS, preempted[1][-3000:]
    committed = s3(ckpt, seaweed).exists(f"step-{preempted_at:09d}/manifest.json")
    finished = collect(launch(job, env, base / "node-3"))
    return dict(base=base, reference=reference, crashed=crashed, half=half, preempted=preempted, preempted_at=preempted_at, committed=committed, finished=finished, ckpt=ckpt, seaweed=seaweed, job=job)


def steps(events: list[dict]) -> list[int]:
    return [e["step"] for e in events if e["event"] == "step"]


def test_crash_during_upload_leaves_a_half_checkpoint_that_resume_skips(runs):
    events, stderr, code = runs["crashed"]
    assert code != 0 and "Signal 9 (SIGKILL)" in stderr
    # The checkpoint event comes once the local files are written; step 4 then died uploading.
    assert [e["name"] for e in events if e["event"] == "checkpoint"] in (["step-000000002"], ["step-000000002", "step-000000004"])
    assert runs["half"] and "step-000000004/manifest.json" not in runs["half"]

    events, stderr, _ = runs["preempted"]
    assert next(e for e in events if e["event"] == "resume") == {"event": "resume", "from": "step-000000002", "step": 2}
    assert f"skipping checkpoint {runs['ckpt']}/step-000000004: incomplete: no manifest.json" in stderr
    assert steps(events)[0] == 3


def test_sigterm_commits_a_checkpoint_then_exits_75(runs):
    events, stderr, _ = runs["preempted"]
    at = runs["preempted_at"]
    assert at >= 5 and steps(events)[-1] == at
    assert events[-2]["event"] == "checkpoint" and events[-2]["name"] == f"step-{at:09d}"
    assert runs["committed"]
    # The first rank to finish exits 75; torchrun then ends the gang (and itself returns 1).
    assert f"exitcode  : {exitcodes.PREEMPTED}" in stderr, stderr[-3000:]
    assert stderr.count("received SIGTERM: finishing the current step") == 2


def test_restarted_run_ends_bit_identical_to_the_uninterrupted_one(runs):
    import torch

    events, stderr, code = runs["finished"]
    assert code == 0, stderr[-3000:]
    at = runs["preempted_at"]
    assert next(e for e in events if e["event"] == "resume")["from"] == f"step-{at:09d}"
    assert steps(events) == list(range(at + 1, STEPS + 1))
    # Same per-step losses as the reference from the resume point on.
    reference_losses = {e["step"]: e["loss"] for e in runs["reference"][0] if e["event"] == "step"}
    assert {e["step"]: e["loss"] for e in events if e["event"] == "step"} == {s: reference_losses[s] for s in range(at + 1, STEPS + 1)}

    expected = adapter_tensors(runs["base"] / "reference" / "out")
    got = adapter_tensors(runs["base"] / "chain" / "out")
    assert expected.keys() == got.keys() and len(expected) == 8  # q and v, A and B, 2 layers
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # Checkpoints rotated to the newest two.
    names = {o.key.split("/")[0] for o in s3(runs["ckpt"], runs["seaweed"]).list() if o.key.startswith("step-")}
    saved = {at} | {s for s in range(at + 1, STEPS + 1) if s % 2 == 0 or s == STEPS}
    assert names == {f"step-{s:09d}" for s in sorted(saved)[-2:]}


def test_zero3_adapter_is_complete_and_merges_to_the_same_logits(runs, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.api.spec import load_job
    from kubetune.train.export import run_merge

    out = runs["base"] / "chain" / "out"
    tensors = adapter_tensors(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hidden = base.config.hidden_size
    for name, tensor in tensors.items():  # ZeRO-3 shards gathered: full shapes, trained values
        assert tensor.shape == ((4, hidden) if "lora_A" in name else (hidden, 4)), name
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # B starts at zero
    assert AutoTokenizer.from_pretrained(out / "adapter").chat_template

    # The --merge step (base from the local folder, adapter and model under the local output).
    assert run_merge(load_job(runs["job"]), runs["job"].parent, runs["base"] / "cache")["model"] == f"file://{out / 'model'}"

    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(out / "adapter").chat_template
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (out / "model").iterdir()}
    assert not (out / "model" / "adapter_config.json").exists()


def test_resuming_with_another_world_size_fails_clearly(runs, make_engine, s3_env, tmp_path):
    from kubetune.artifacts.checkpoint import CheckpointManager, WorldSizeMismatch

    manager = CheckpointManager(runs["ckpt"], keep=2, local_dir=tmp_path / "node", rank=0, world_size=1)
    with pytest.raises(WorldSizeMismatch, match=r"written by 2 ranks \(ZeRO stage 3\) but this run has 1 ranks. Resume with 2 ranks"):
        manager.resume(make_engine())
    assert not (tmp_path / "node").exists()  # refused before downloading anything

"""kubetune-train end to end: single process with preemption, resume, metrics and merge;
two processes (torchrun + gloo) with ZeRO-2 and ZeRO-3 + offload, exported weights loaded
with plain from_pretrained."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from kubetune.api import exitcodes
from kubetune.artifacts.net import free_port

pytestmark = pytest.mark.slow


def write_job(folder: Path, model_dir: Path, name: str, **spec) -> Path:
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(40)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    body = {
        "model": {"uri": str(model_dir)},
        "dataset": {"uri": "data.jsonl", "validation": {"ratio": 0.1}},
        "training": {"maxSteps": 6, "learningRate": 0.01, "microBatchSize": 2, "gradientAccumulationSteps": 2,
                     "maxLength": 64, "logEverySteps": 1},
        "checkpoint": {"everySteps": 4, "keep": 2},
    }
    body.update(spec)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}))
    return path


def env(tmp_path: Path, metrics_port: int = 0) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": str(metrics_port),
            "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"), "MASTER_PORT": str(free_port())}


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def torchrun(job: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "kubetune.train.main", "--job", str(job)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env(tmp_path))


PREEMPTED_JOB = dict(
    method={"type": "lora", "lora": {"r": 4, "dropout": 0.1, "targetModules": ["all-linear"]}},
    training={"maxSteps": 40, "learningRate": 0.01, "microBatchSize": 2, "maxLength": 64, "logEverySteps": 1,
              "eval": {"generate": True, "maxSamples": 2, "maxNewTokens": 3}},
    checkpoint={"everySteps": 1000, "keep": 2},
)


def test_preempt_resume_metrics_and_merge(tmp_path, tiny_model_dir):
    job = write_job(tmp_path, tiny_model_dir, "pre", **PREEMPTED_JOB)
    port = free_port()
    cmd = [sys.executable, "-m", "kubetune.train.main", "--job", str(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path, port))
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "step":
            break
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == exitcodes.PREEMPTED, stderr[-3000:]
    first = seen + events(rest)
    assert first[0]["event"] == "start" and first[0]["trainable_params"] < first[0]["total_params"]
    assert 'kubetune_train_step{finetunejob="pre"} 1.0' in scraped
    assert 'kubetune_train_total_steps{finetunejob="pre"} 40.0' in scraped
    stopped = first[-1]
    assert stopped["event"] == "preempted" and 1 <= stopped["step"] < 40
    assert first[-2] == {**first[-2], "event": "checkpoint", "step": stopped["step"], "name": f"step-{stopped['step']:09d}"}
    progress = json.loads((tmp_path / "runs/pre/output/checkpoints/progress.json").read_text())
    assert progress["last_checkpoint"] == f"step-{stopped['step']:09d}" and progress["phase"] == "training"

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    second = events(again.stdout)
    assert second[1] == {"event": "resume", "from": f"step-{stopped['step']:09d}", "step": stopped["step"]}
    steps = [e["step"] for e in second if e["event"] == "step"]
    assert steps == list(range(stopped["step"] + 1, 41))
    evaluation = [e for e in second if e["event"] == "eval"][-1]
    assert set(evaluation) == {"event", "step", "validation_loss", "exact_match", "token_f1", "rouge_1", "rouge_2", "rouge_l", "bleu_4"}
    done = second[-1]
    assert done["event"] == "done" and done["step"] == 40
    summary = json.loads((tmp_path / "runs/pre/output/summary.json").read_text())
    assert [s for s, _ in summary["losses"]] == list(range(1, 41))  # losses from before the preemption kept
    assert summary["final_loss"] < summary["first_loss"]
    logged = [json.loads(line) for line in (tmp_path / "runs/pre/output/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["event"] == "step"] == list(range(1, 41))  # lines from before the preemption kept

    # Resuming is exact: the same losses as a run that was never interrupted (data position,
    # optimizer, scheduler and dropout RNG all restored).
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    straight = subprocess.run([sys.executable, "-m", "kubetune.train.main", "--job", str(write_job(straight_dir, tiny_model_dir, "pre", **PREEMPTED_JOB))],
                              capture_output=True, text=True, timeout=300, env=env(tmp_path))
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = json.loads((straight_dir / "runs/pre/output/summary.json").read_text())["losses"]
    assert [s for s, _ in reference] == [s for s, _ in summary["losses"]]
    for (_, want), (_, got) in zip(reference, summary["losses"]):
        assert got == pytest.approx(want, rel=1e-5)

    # The --merge step (in-process: merging needs no process group).
    from transformers import AutoModelForCausalLM

    from kubetune.api.spec import load_job
    from kubetune.train.export import run_merge

    assert run_merge(load_job(job), tmp_path, cache_dir=tmp_path / "cache")["model"] == f"file://{tmp_path}/runs/pre/output/model"

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/pre/output/model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def _changed(model, base) -> set[str]:
    theirs = dict(base.named_parameters())
    return {n for n, p in model.named_parameters() if not torch.equal(p, theirs[n])}


def test_two_processes_zero2_freeze_packed_exports_loadable_weights(tmp_path, tiny_model_dir):
    job = write_job(tmp_path, tiny_model_dir, "z2", method={"type": "freeze", "freeze": {"lastLayers": 1}},
                    distributed={"zero": {"stage": 2}},
                    training={"maxSteps": 6, "learningRate": 0.01, "microBatchSize": 1, "maxLength": 64, "logEverySteps": 1, "packing": True})
    with (tmp_path / "data.jsonl").open("a") as data:  # trained as text, counted and warned about
        data.write(json.dumps({"prompt": "Say <|im_end|> please", "response": "<|im_end|>"}) + "\n")
    proc = torchrun(job, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = events(proc.stdout)
    assert out[0]["world_size"] == 2 and out[-1]["event"] == "done" and out[-1]["step"] == 6
    assert out[0]["rows"] < out[0]["train_samples"]  # packed: several samples per row
    assert out[0]["special_text_samples"] == 1 and "1 samples spell special tokens" in proc.stderr
    saves = [e for e in out if e["event"] == "checkpoint"]  # step 4 uploads in the background; the final save waits
    assert [e["step"] for e in saves] == [4, 6] and saves[0]["committed"] in (None, saves[0]["name"])
    assert saves[-1]["committed"] == saves[-1]["name"]
    assert all(e["grad_norm"] > 0 for e in out if e["event"] == "step")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/z2/output/model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = _changed(model, base)
    assert changed and all("layers.1." in n for n in changed)  # layer 0, embeddings, head: bit-identical


def test_two_processes_zero3_offload_full_exports_loadable_weights(tmp_path, tiny_model_dir):
    job = write_job(tmp_path, tiny_model_dir, "z3", method={"type": "full"},
                    distributed={"zero": {"stage": 3, "offload": "all"}})
    proc = torchrun(job, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = events(proc.stdout)
    assert out[0]["zero_stage"] == 3 and out[-1]["event"] == "done"
    losses = [e["loss"] for e in out if e["event"] == "step"]
    assert losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/z3/output/model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert _changed(model, base) == {n for n, _ in base.named_parameters()}

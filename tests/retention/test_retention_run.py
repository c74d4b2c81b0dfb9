"""spec.retention through kubetune-train on the tiny model: the replay answers are generated
once and reused by a resumed run; the probe figures land in the events, summary.json,
progress.json (what the operator reads) and the Prometheus metrics; two ZeRO-3 ranks split
the generation and get the answers one process gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import generate_latest

from kubetune.api import exitcodes
from kubetune.artifacts.net import free_port

pytestmark = pytest.mark.slow

RETENTION = {"replay": {"ratio": 0.5, "maxNewTokens": 8}, "probes": {"maxNewTokens": 4, "warnBelow": 0.95}, "batchSize": 16}


def write_job(folder: Path, model_dir: Path, name: str, **spec) -> Path:
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(20)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    body = {
        "model": {"uri": str(model_dir)},
        "dataset": {"uri": "data.jsonl"},
        "method": {"type": "lora", "lora": {"r": 4, "dropout": 0.0}},
        "training": {"maxSteps": 30, "learningRate": 0.01, "microBatchSize": 2, "maxLength": 64, "logEverySteps": 1},
        "checkpoint": {"everySteps": 1000, "keep": 2},
        "retention": RETENTION,
        **spec,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}))
    return path


def env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"), "MASTER_PORT": str(free_port())}


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def by_kind(seen: list[dict], kind: str) -> list[dict]:
    return [e for e in seen if e["event"] == kind]


def test_replay_is_reused_after_preemption_and_the_figures_are_reported(tmp_path, tiny_model_dir):
    job = write_job(tmp_path, tiny_model_dir, "keep")
    cmd = [sys.executable, "-m", "kubetune.train.main", "--job", str(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path))
    first = []
    for line in proc.stdout:
        first.append(json.loads(line))
        if first[-1]["event"] == "step":
            break
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=300)
    assert proc.returncode == exitcodes.PREEMPTED, stderr[-3000:]
    first += events(rest)
    (replay,) = by_kind(first, "replay")
    assert replay["cached"] is False and replay["replay_prompts"] == 10 and replay["samples"] == 10 and replay["probes"] >= 80
    cache = Path(replay["cache"].removeprefix("file://"))
    assert cache.parent == tmp_path / "runs/keep/output/checkpoints/retention" and cache.is_file()
    written = cache.read_bytes(), cache.stat().st_mtime_ns
    assert by_kind(first, "start")[0]["replay_samples"] == 10 and by_kind(first, "start")[0]["rows"] == 30

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    second = events(again.stdout)
    assert [e["event"] for e in second[:3]] == ["replay", "start", "resume"]
    assert second[0] == {**replay, "cached": True, "seconds": 0.0}  # read back, not generated again
    assert (cache.read_bytes(), cache.stat().st_mtime_ns) == written

    (report,) = by_kind(second, "retention")
    base_right, kept = report["base_right"], report["kept"]
    assert report["probes"] == replay["probes"] and 0 <= kept <= base_right <= report["probes"]
    assert len(report["lost"]) == base_right - kept and report["warn_below"] == 0.95
    assert report["below_threshold"] == (base_right > 0 and kept / base_right < 0.95)
    assert report["replay"]["samples"] == 10 and report["replay"]["cached"] is True
    summary = json.loads((tmp_path / "runs/keep/output/summary.json").read_text())
    assert summary["retention"] == {k: v for k, v in report.items() if k != "event"} and summary["replay_samples"] == 10
    progress = json.loads((tmp_path / "runs/keep/output/checkpoints/progress.json").read_text())
    assert progress["phase"] == "done"
    assert progress["retention"] == {
        "probes": report["probes"], "base_right": base_right, "kept": kept, "kept_ratio": report["kept_ratio"],
        "warn_below": 0.95, "below_threshold": report["below_threshold"], "lost": [e["question"] for e in report["lost"]],
    }  # fmt: skip


def test_the_reporter_sends_the_figures_to_metrics_events_and_progress(tmp_path, tiny_model_dir, capsys):
    from kubetune.api.layout import job_layout
    from kubetune.api.spec import load_job
    from kubetune.train.events import EventStream
    from kubetune.train.reporter import Reporter

    job = load_job(write_job(tmp_path, tiny_model_dir, "qa"))
    reporter = Reporter(job, job_layout(job, tmp_path), world_size=1, main=True, events=EventStream(sys.stdout))
    reporter.replay({"replay_prompts": 15, "replay_finished": 14, "probes": 94, "cached": False, "seconds": 3.5, "cache": "c", "samples": 15})
    lost = [{"question": "What is 7 times 8?", "expect": ["56"], "base": "56.", "tuned": "54."}]
    report = {"probes": 94, "base_right": 15, "kept": 14, "kept_ratio": 0.9333, "warn_below": 0.95, "below_threshold": True,
              "unchanged": 80, "similarity": 0.9, "lost": lost, "gained": [], "replay": {"samples": 15}}  # fmt: skip
    reporter.retention(report)
    scraped = generate_latest(reporter.metrics.registry).decode()
    assert 'kubetune_train_retention_kept_ratio{finetunejob="qa"} 0.9333' in scraped
    assert 'kubetune_train_retention_probes{finetunejob="qa",outcome="kept"} 14.0' in scraped
    assert 'kubetune_train_retention_probes{finetunejob="qa",outcome="base_right"} 15.0' in scraped
    assert 'kubetune_train_retention_probes{finetunejob="qa",outcome="lost"} 1.0' in scraped
    assert 'kubetune_train_retention_probes{finetunejob="qa",outcome="gained"} 0.0' in scraped
    assert 'kubetune_train_replay_samples{finetunejob="qa"} 15.0' in scraped
    assert [e["event"] for e in events(capsys.readouterr().out)] == ["replay", "retention"]
    progress = json.loads((tmp_path / "runs/qa/output/checkpoints/progress.json").read_text())
    assert progress["retention"] == {"probes": 94, "base_right": 15, "kept": 14, "kept_ratio": 0.9333, "warn_below": 0.95,
                                     "below_threshold": True, "lost": ["What is 7 times 8?"]}  # fmt: skip


def test_two_zero3_ranks_split_the_generation_and_answer_as_one_process(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.api.spec import load_job
    from kubetune.artifacts.storage import open_store
    from kubetune.data.loader import load_datasets
    from kubetune.retention import Retention

    # Paraphrases on: the rewrites are split over the ranks like the replay answers.
    job = write_job(tmp_path, tiny_model_dir, "z3", distributed={"gpusPerNode": 2, "zero": {"stage": 3}},
                    training={"maxSteps": 3, "learningRate": 0.01, "microBatchSize": 2, "maxLength": 64, "logEverySteps": 1},
                    retention={**RETENTION, "paraphrases": {"count": 1, "maxNewTokens": 8}})  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "kubetune.train.main", "--job", str(job)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = events(proc.stdout)
    (replay,) = by_kind(seen, "replay")
    assert replay["cached"] is False and len(by_kind(seen, "retention")) == 1 and replay["rewrite_questions"] == 20
    # LoRA replays by KL toward the base's distributions recorded while generating: no base forward in training
    assert replay["loss"] == "kl" and len(by_kind(seen, "step")) == 3
    distributed = Path(replay["cache"].removeprefix("file://")).read_bytes()

    # One process, the same job, no DeepSpeed: the same cache entry, byte for byte.
    parsed = load_job(job)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data, _ = load_datasets(parsed.spec.dataset, parsed.spec.training.seed, tmp_path / "d", tmp_path)
    alone = Retention.plan(parsed, data, cache_dir=tmp_path / "c")
    store = open_store(str(tmp_path / "alone"))
    key = alone.key(parsed, tokenizer, tiny_model_dir, None, "fp32")
    alone.prepare(store, key, tokenizer, lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                  {"zero_optimization": {"stage": 0}}, rank=0, world=1, device=torch.device("cpu"))  # fmt: skip
    assert replay["cache"].endswith(f"base-answers-{key}.json")
    assert store.get_bytes(f"retention/base-answers-{key}.json") == distributed
    # The distributions too, from the partitioned model, up to float rounding.
    from safetensors.torch import load

    split = load(Path(replay["cache"].removeprefix("file://")).with_name(f"base-targets-{key}.safetensors").read_bytes())
    whole = load(store.get_bytes(f"retention/base-targets-{key}.safetensors"))
    assert torch.equal(split["ids"], whole["ids"]) and torch.allclose(split["logp"], whole["logp"], atol=1e-4)
    rewrites = json.loads(distributed)["paraphrases"]
    assert [r["question"] for r in rewrites] == [f"What is {i} plus {i}?" for i in range(20)]
    assert all(len(r["written"]) == 3 for r in rewrites)


def test_full_fine_tuning_replays_by_kl_toward_the_recorded_distributions(tmp_path, tiny_model_dir):
    # No adapter to switch off: the base's distributions were recorded while it wrote the answers.
    job = write_job(tmp_path, tiny_model_dir, "full", method={"type": "full"},
                    training={"maxSteps": 4, "learningRate": 1e-3, "microBatchSize": 2, "maxLength": 64, "logEverySteps": 1})  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "kubetune.train.main", "--job", str(job)], capture_output=True, text=True, timeout=300, env=env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = events(proc.stdout)
    (replay,) = by_kind(seen, "replay")
    assert replay["loss"] == "kl" and replay["samples"] == 10 and 0.0 < replay["replay_top_k_mass"] <= 1.0
    cache = Path(replay["cache"].removeprefix("file://"))
    assert cache.with_name(cache.name.replace("base-answers-", "base-targets-").replace(".json", ".safetensors")).is_file()
    steps = by_kind(seen, "step")
    assert len(steps) == 4 and all(0.0 <= s["loss"] < 20 for s in steps)
    assert len(by_kind(seen, "retention")) == 1

"""Smoke test of the benchmarks at tiny sizes: they run against the real components, report
their figures under the documented keys, and give a ratio only when the work was equal.
No timing is asserted (speed figures come from `make bench`)."""

from __future__ import annotations

import json

import pytest

from bench import gpu, run_cpu, zero_memory
from bench.common import MEMORY_SHAPE, equal_work, job_document, ratio, same, write_jsonl


def test_unequal_work_gets_no_ratio():
    work = equal_work(tokens=same(1000, 1100, tolerance=0.03), steps=same(4, 4))
    assert work["ok"] is False and work["checks"]["tokens"]["equal"] is False
    assert ratio(200.0, 100.0, work) is None
    assert ratio(200.0, 100.0, equal_work(steps=same(4, 4))) == 2.0
    assert ratio(1.0, 4.0, equal_work(steps=same(4, 4)), higher_is_better=False) == 4.0


@pytest.mark.slow
def test_quick_cpu_benchmarks_report_equal_work_and_ratios(tmp_path):
    results = run_cpu.run_all(["trainer_throughput", "operator_scale"], tmp_path / "work", quick=True)
    for key in ("cpu_model", "cpu_cores", "memory_bytes", "python", "torch", "deepspeed", "date"):
        assert results["machine"][key], key

    trainer = results["trainer_throughput"]
    assert "error" not in trainer, trainer.get("error")
    assert trainer["equal_work"]["ok"], json.dumps(trainer["equal_work"])
    assert set(trainer["equal_work"]["checks"]) >= {"samples", "non_padding_tokens", "model_params"}
    assert trainer["ratio"] > 0 and trainer["goal"]["met"] in (True, False)
    assert trainer["kubetune_packed"]["steps"] < trainer["baseline"]["steps"]  # packing fills rows
    dynamic = trainer["kubetune_dynamic_padding"]
    assert dynamic["equal_work"]["checks"]["steps"]["equal"] and dynamic["ratio"] > 0

    operator = results["operator_scale"]
    assert "error" not in operator, operator.get("error")
    assert operator["equal_work"]["ok"] and operator["operator"]["jobs_complete"] == operator["jobs"]
    assert operator["floor"]["requests_per_job"] == 1 + operator["children_per_job"]
    assert operator["operator"]["api_requests"] > 0 and operator["operator"]["operator_peak_rss_bytes"] > 0
    assert operator["ratio"] > 0

    table = run_cpu.markdown(results)
    assert "| trainer_throughput |" in table and "| operator_scale |" in table


@pytest.mark.slow
def test_quick_peer_benchmark_checks_equal_work_against_each_padding_free_peer(tmp_path):
    results = run_cpu.run_all(["trainer_vs_peer"], tmp_path / "work", quick=True)
    peer = results["trainer_vs_peer"]
    assert "error" not in peer, peer.get("error")
    assert set(peer["peers"]) == {"hf_trainer_flattening", "trl_sft_bfd_packing"}
    for name, figures in peer["peers"].items():
        assert "error" not in figures, (name, figures.get("error"))
        checks = figures["equal_work"]["checks"]
        assert figures["equal_work"]["ok"], (name, json.dumps(checks))
        assert set(checks) >= {"samples", "non_padding_tokens", "answer_tokens", "steps", "model_params"}
        assert figures["ratio"] > 0 and set(figures["loss"]) == {"equal", "mean_loss", "final_loss"}
    assert peer["best_peer"] in peer["peers"] and peer["ratio"] == peer["peers"][peer["best_peer"]]["ratio"]
    assert peer["goal"]["met"] in (True, False)
    assert "| trainer_vs_peer |" in run_cpu.markdown(results)


def test_zero_memory_planner_figures_and_gpu_dry_run(tmp_path):
    from transformers import LlamaConfig

    # The full-size benchmark model's config (no weights needed by the planner).
    config = LlamaConfig(vocab_size=516, **MEMORY_SHAPE).to_dict()
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "a"}])
    cfg = zero_memory.settings(quick=False)
    figures = {}
    for name, zero in zero_memory.CONFIGS.items():
        doc = job_document("z", tmp_path / "model", data, training=zero_memory.training_block(cfg), distributed={"nodes": 1, "gpusPerNode": 2, "zero": zero})
        figures[name] = zero_memory.planner_per_rank(doc, config)["cpu_rank_bytes"]
    # Partitioning shrinks a rank; on CPU, offload only moves states within the same RAM.
    assert all(figures[name] < figures["ddp"] for name in ("zero2", "zero3", "zero3_offload")), figures

    plan = gpu.dry_run(gpu.all_configs("1b-"), tmp_path / "gpu", gpus=1, steps=5, gpu_bytes=80 * 1024**3)
    assert set(plan) == {c.name for c in gpu.all_configs("1b-")}
    for name, entry in plan.items():
        assert entry["planner"]["per_gpu_bytes"] > 0 and entry["flops_per_token_at_512"] > 0
        assert entry.get("deepspeed_zero", {}).get("stage") in (2, 3) or "skipped" in entry, name
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and gpu.peak_tflops("Unknown GPU") is None


def test_retention_figures_check_the_general_goal_on_both_question_sets():
    """bench.retention counts the question file's general questions and the 60 more of
    bench/heldout/general.jsonl together for the 14-of-15 goal, and shows each."""
    from bench import retention
    from kubetune.cli.run import load_questions, score

    more = load_questions(retention.GENERAL)
    assert len(more) == 60 and {q["kind"] for q in more} == {"general"}
    asked = [{"kind": "trained", "question": "q", "expect": ["a"]}, {"kind": "general", "question": "g", "expect": ["yes"]}]
    answers = {"scores": score(asked, ["a", "no"], ["a", "yes"])}  # the one general answer the base had right is lost
    answers["general_more"] = {"scores": score(more, [q["expect"][0] for q in more], [q["expect"][0] for q in more])}
    result = {"figures": retention.figures(answers, None), "wall_seconds": 100.0, "set": "s", "tag": "", "cpu_seconds": 1.0,
              "load_average_before": [0.1], "load_average_after": [0.2]}
    f = result["figures"]
    assert f["general_kept"]["kept"] == 0 and f["general_kept"]["base_right"] == 1
    assert f["general_more_kept"]["kept"] == f["general_more_kept"]["base_right"] == 60
    assert (f["general_all_kept"]["kept"], f["general_all_kept"]["base_right"]) == (60, 61)
    assert retention.met(result)["general_kept"] is True  # 60/61 >= 14/15
    answers["general_more"]["scores"]["general"]["kept"] = 55
    result["figures"] = retention.figures(answers, None)
    assert retention.met(result)["general_kept"] is False  # 55/61 < 14/15
    assert "| 0/1 | 55/60 |" in retention.table([result])


def test_adapter_scale_merges_that_share_of_the_trained_update(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.adapter_scale import scaled_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a trained update (B starts at zero)
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    merged = {s: scaled_model(tiny_model_dir, tmp_path / "adapter", s).state_dict() for s in (0.0, 0.5, 1.0)}
    key = next(k for k in base if k.endswith("q_proj.weight"))
    update = merged[1.0][key] - base[key]
    assert float(update.abs().max()) > 1e-3
    assert torch.allclose(merged[0.0][key], base[key])
    assert torch.allclose(merged[0.5][key] - base[key], update / 2, atol=1e-6)

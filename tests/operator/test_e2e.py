"""End to end on one machine: kubectl applies a LoRA FineTuneJob with 2 worker pods to the
local control plane (a namespace enforcing the `restricted` Pod Security Standard); the real
operator (its own process, the chart's ServiceAccount and RBAC) creates the children; the
real scheduler binds them to a node agent that runs them as local processes (torchrun +
kubetune-train on CPU, checkpoints in SeaweedFS, the merge pod, and kubetune-serve in the pod
the real ReplicaSet controller makes for the serving Deployment). One worker is SIGKILLed
after a checkpoint: the operator replaces the gang, which resumes from the newest complete
checkpoint, and names the killed pod's last log lines (read through the API server's
pods/log) in its GangRestart Event; then merge, and the inference Deployment answers a chat
request through the OpenAI client with the merged model's own greedy answer."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from node_agent import NodeAgent
from operator_harness import wait_for

from kubetune.api.progress import parse_progress
from kubetune.artifacts.storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QA = [("What is the capital of France?", "Paris."), ("What colour is the sky?", "Blue."),
      ("How many legs has a cat?", "Four."), ("What do bees make?", "Honey.")]  # fmt: skip


def job_document(seaweed) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "e2e"},
        "spec": {
            "model": {"uri": "s3://models/e2e-tiny"},
            "dataset": {"uri": "s3://data/e2e/train.jsonl", "format": "prompt_response"},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}},
            "training": {"maxSteps": 24, "learningRate": 0.01, "microBatchSize": 1, "maxLength": 64, "logEverySteps": 1, "precision": "fp32"},
            "distributed": {"nodes": 2, "gpusPerNode": 1, "zero": {"stage": 0}},
            "resources": {"limits": {"nvidia.com/gpu": 0}},
            "checkpoint": {"everySteps": 1, "keep": 2},
            "storage": {"endpoint": seaweed.endpoint, "credentialsSecret": "s3-credentials"},
            "output": {"uri": "s3://outputs/e2e", "merge": True},
            "serving": {"enabled": True, "generation": {"temperature": 0, "maxTokens": 8}},
            "runPolicy": {"backoffLimit": 1},
        },
    }


def greedy_answer(local: Path, messages: list[dict], max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    open_store("s3://outputs/e2e/model").get_dir("", local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_lora_job_trains_on_two_workers_merges_and_serves(seaweed, s3_env, tiny_model_dir, operator, ns, kubectl, kube_api,
                                                          control_plane, tmp_path):  # fmt: skip
    open_store("s3://models/e2e-tiny").put_dir(tiny_model_dir, "")
    lines = [json.dumps({"prompt": q, "response": a}) for q, a in QA * 4]
    open_store("s3://data/e2e").put_bytes("train.jsonl", "\n".join(lines).encode())
    ns.create_secret("s3-credentials", {k: v for k, v in seaweed.env.items() if k.startswith("AWS_") and "KEY" in k})
    job_file = tmp_path / "e2e.yaml"
    job_file.write_text(yaml.safe_dump(job_document(seaweed)))

    # The pods get the S3 keys only through their secretKeyRefs, nothing from this process.
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_", "KUBECONFIG"))}
    base_env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{base_env['PATH']}")

    def committed_step() -> int:
        try:
            progress = parse_progress(open_store("s3://outputs/e2e/checkpoints").get_bytes("progress.json"))
        except FileNotFoundError:
            return 0
        return int(progress.last_checkpoint.rsplit("-", 1)[1]) if progress.last_checkpoint else 0

    node = NodeAgent(kube_api, control_plane, tmp_path / "node", base_env, node_env={"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}).start()
    try:
        kubectl.apply(job_file)
        wait_for(lambda: len([p for p in ns.workers("e2e").values() if p["spec"].get("nodeName") == node.name]) == 2, 60,
                 "two worker pods bound to the node")  # fmt: skip
        # Crash one worker once a checkpoint is committed (progress.json says so) and training goes on.
        # A save every step waits for the previous upload, so training runs at upload speed and
        # the kill lands long before step 24 however fast the tiny model's steps are.
        wait_for(lambda: committed_step() >= 3, 300, "a committed checkpoint", interval=0.05)
        node.kill("e2e-worker-1", ns.name)
        killed_after = committed_step()
        phases = set()

        def serving_ready():
            st = ns.status("e2e")
            phases.add(st.get("phase"))
            if st.get("phase") == "Failed":
                pytest.fail(f"job failed: {st.get('failure')}")
            return any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", [])) and st

        try:
            st = wait_for(serving_ready, 420, "serving ready", interval=0.5)
        except AssertionError:
            for (namespace, name), run in node.pods.items():
                for container in run.all():
                    print(f"--- {namespace}/{name} {container.name} (exit {container.exit_code})\n{node.log(name, namespace, container.name)[-3000:]}")
            print("node errors:", node.errors, "\nstatus:", json.dumps(ns.status("e2e"), indent=1), "\noperator log:\n", operator.log()[-5000:])
            raise
        assert {"Running", "Merging", "Serving"} <= phases
        assert st["progress"]["step"] == st["progress"]["totalSteps"] == 24 and st["progress"]["summary"] == "24/24"
        # One gang restart. Which worker it blames races between the two pods' reports (the
        # killed one, 137, or its peer exiting on the broken rendezvous); the pure blame
        # order is tested in test_status.py.
        assert st["loss"] > 0 and st["restarts"] == 1 and st["lastFailedPod"] in ("e2e-worker-0", "e2e-worker-1")
        restart_events = [e["message"] for e in ns.events("e2e") if e["reason"] == "GangRestart"]
        assert len(restart_events) == 1 and "failed with exit code" in restart_events[0]
        # The blamed pod's last log lines, as the API server's pods/log served them from the node
        # (an Event keeps its message's first and last 500 characters, joined by " ... ").
        tail = restart_events[0].split("Last log lines:\n", 1)[1].rsplit("; restarting the gang", 1)[0].splitlines()
        whole = [line for line in tail[1:] if " ... " not in line]
        assert len(whole) > 1 and all(line in node.log(st["lastFailedPod"], ns.name, "trainer") for line in whole)
        resumed = [json.loads(line) for line in node.log("e2e-worker-0", ns.name, "trainer").splitlines() if line.startswith('{"event": "resume"')]
        assert resumed and resumed[0]["from"] == f"step-{resumed[0]['step']:09d}"
        assert killed_after <= resumed[0]["step"] < 24  # the newest complete checkpoint, not a restart from zero
        assert st["lastCheckpoint"].endswith("step-000000024")
        assert st["outputs"] == {"adapterUri": "s3://outputs/e2e/adapter", "mergedUri": "s3://outputs/e2e/model"}
        assert open_store("s3://outputs/e2e").exists("model/config.json")
        # Every pod of the job was admitted by the namespace's `restricted` Pod Security Standard and ran here.
        assert "Forbidden" not in ns.event_reasons("e2e") and {"e2e-merge"} <= {name for _, name in node.pods}
        assert not node.errors

        from openai import OpenAI

        question = [{"role": "user", "content": "What is the capital of France?"}]
        client = OpenAI(base_url=node.service_url("e2e-serve", 8000) + "/v1", api_key="unused", timeout=60)
        answer = client.chat.completions.create(model="e2e", messages=question)
        assert answer.model == "e2e" and answer.choices[0].finish_reason in ("stop", "length")
        # The server serves the merged model: its greedy answer is the merged model's own.
        assert answer.choices[0].message.content == greedy_answer(tmp_path / "merged", question, max_new_tokens=8)
    finally:
        node.stop()

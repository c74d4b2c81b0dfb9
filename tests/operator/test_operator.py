"""The real operator (kopf) against kmock, driven by the real kubectl applying examples/.

Pod phases are set through the API as a kubelet would; the operator must follow.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request

import pytest

from operator_harness import REPO, Operator, wait_for

EXAMPLE = REPO / "examples" / "lora-multinode.yaml"
WORKERS = ("qa-bot-worker-0", "qa-bot-worker-1")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-value"}

pytestmark = pytest.mark.timeout(120)


def status(kubectl, name="qa-bot") -> dict:
    return kubectl.get_json("ftj", name).get("status") or {}


def phase_is(kubectl, phase, name="qa-bot"):
    return lambda: status(kubectl, name).get("phase") == phase and status(kubectl, name)


def workers(cluster) -> dict[str, dict]:
    return {n: p for n, p in cluster.objects("pods").items() if p["metadata"]["labels"].get("kubetune.io/role") == "worker"}


def creates(cluster, plural: str) -> int:
    """POST requests the API server received for a resource (the operator's creations)."""
    return cluster.run(lambda e: sum(1 for r in list(e) if r.method == "POST" and r.resource is not None and r.resource.plural == plural))


def event_reasons(cluster) -> list[str]:
    events = sorted(cluster.objects("events").values(), key=lambda e: e["metadata"]["resourceVersion"])
    return [e["reason"] for e in events if e.get("involvedObject", {}).get("name") == "qa-bot"]


def start_job(api, kubectl, cluster):
    api.create_secret("s3-credentials", CREDENTIALS)
    kubectl.apply(EXAMPLE)
    wait_for(lambda: len(workers(cluster)) == 2, what="two worker pods")


def run_workers(api, cluster):
    for name in workers(cluster):
        api.set_pod_status(name, "Running")


def test_children_appear_once_and_status_follows_pod_phases(operator, cluster, api, kubectl):
    start_job(api, kubectl, cluster)
    assert set(cluster.objects("configmaps")) == {"qa-bot-config"}
    assert set(cluster.objects("services")) == {"qa-bot-workers"}
    pods = workers(cluster)
    assert sorted(pods) == list(WORKERS)
    owner = pods["qa-bot-worker-0"]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == kubectl.get_json("ftj", "qa-bot")["metadata"]["uid"]
    assert wait_for(phase_is(kubectl, "Pending"))["startTime"]
    time.sleep(1.5)  # several reconcile cycles
    assert creates(cluster, "pods") == 2 and creates(cluster, "configmaps") == 1 and creates(cluster, "services") == 1

    api.set_pod_status("qa-bot-worker-0", "Running")
    time.sleep(0.8)
    assert status(kubectl)["phase"] == "Pending"  # the gang is not complete yet
    api.set_pod_status("qa-bot-worker-1", "Running")
    st = wait_for(phase_is(kubectl, "Running"), what="Running")
    assert st["observedGeneration"] == 1 and st["restarts"] == 0
    memory = next(c for c in st["conditions"] if c["type"] == "MemoryFits")  # smollm2-135m's shipped config
    assert memory["status"] == "True" and "of 64.0 GiB" in memory["message"]
    assert wait_for(lambda: event_reasons(cluster)[:2] == ["Created", "Running"], what="events")
    # Nothing secret leaks into the status or the events.
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(st) + json.dumps(cluster.objects("events"))


def test_failed_worker_restarts_the_gang_then_backoff_limit_fails_the_job(operator, cluster, api, kubectl):
    start_job(api, kubectl, cluster)
    kubectl("patch", "ftj", "qa-bot", "--type=merge", "-p", '{"spec":{"runPolicy":{"backoffLimit":1}}}')
    run_workers(api, cluster)
    wait_for(phase_is(kubectl, "Running"))
    cluster.run(lambda e: e.logs.__setitem__(("default", "qa-bot-worker-1"), "step 7 loss 2.1\nRuntimeError: NCCL timeout\n"))
    api.set_pod_status("qa-bot-worker-1", "Failed", exit_code=1)
    wait_for(lambda: {p["metadata"]["labels"]["kubetune.io/attempt"] for p in workers(cluster).values()} == {"1"}
             and len(workers(cluster)) == 2, what="a new gang (attempt 1)")  # fmt: skip
    st = status(kubectl)
    assert st["restarts"] == 1 and st["lastFailedPod"] == "qa-bot-worker-1" and st["phase"] == "Restarting"
    assert "GangRestart" in event_reasons(cluster)
    run_workers(api, cluster)
    wait_for(phase_is(kubectl, "Running"))

    cluster.run(lambda e: e.logs.__setitem__(("default", "qa-bot-worker-0"), "RuntimeError: CUDA out of memory\n"))
    api.set_pod_status("qa-bot-worker-0", "Failed", exit_code=137)
    st = wait_for(phase_is(kubectl, "Failed"), what="Failed")
    assert st["failureReason"] == "BackoffLimitExceeded" and st["restarts"] == 1
    assert "qa-bot-worker-0" in st["failure"] and "137" in st["failure"] and "CUDA out of memory" in st["failure"]
    wait_for(lambda: not workers(cluster), what="workers deleted")
    assert "BackoffLimitExceeded" in event_reasons(cluster)
    time.sleep(1)
    assert not workers(cluster)  # a failed job stays down


def test_invalid_input_exit_code_fails_without_retry(operator, cluster, api, kubectl):
    start_job(api, kubectl, cluster)
    run_workers(api, cluster)
    api.set_pod_status("qa-bot-worker-0", "Failed", exit_code=64)
    st = wait_for(phase_is(kubectl, "Failed"))
    assert st["failureReason"] == "InvalidInput" and st["restarts"] == 0


def test_suspend_deletes_workers_and_resume_starts_them_again(operator, cluster, api, kubectl):
    start_job(api, kubectl, cluster)
    run_workers(api, cluster)
    wait_for(phase_is(kubectl, "Running"))
    kubectl("patch", "ftj", "qa-bot", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for(phase_is(kubectl, "Suspended"))
    wait_for(lambda: not workers(cluster), what="workers deleted")
    assert set(cluster.objects("configmaps")) == {"qa-bot-config"}  # the job document stays
    kubectl("patch", "ftj", "qa-bot", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for(lambda: len(workers(cluster)) == 2, what="workers again")
    run_workers(api, cluster)
    st = wait_for(phase_is(kubectl, "Running"))
    assert st["restarts"] == 0
    assert {"Suspended", "Resumed"} <= set(event_reasons(cluster))


def test_training_field_change_on_a_running_job_is_refused(operator, cluster, api, kubectl):
    start_job(api, kubectl, cluster)
    run_workers(api, cluster)
    wait_for(phase_is(kubectl, "Running"))
    kubectl("patch", "ftj", "qa-bot", "--type=merge", "-p", '{"spec":{"training":{"learningRate":0.001}}}')
    st = wait_for(lambda: any(c["type"] == "SpecChangeRefused" for c in status(kubectl).get("conditions", [])) and status(kubectl))
    refused = next(c for c in st["conditions"] if c["type"] == "SpecChangeRefused")
    assert "spec.training" in refused["message"] and st["phase"] == "Running"
    assert "learningRate: 0.0001" in cluster.objects("configmaps")["qa-bot-config"]["data"]["job.yaml"]
    assert st["observedGeneration"] == 2
    # A live spec that no longer parses: reported, and the workers keep their spec.
    kubectl("patch", "ftj", "qa-bot", "--type=merge", "-p", '{"spec":{"distributed":{"nodes":0}}}')
    st = wait_for(lambda: any(c["type"] == "InvalidSpec" for c in status(kubectl).get("conditions", [])) and status(kubectl))
    assert "spec.distributed.nodes" in next(c for c in st["conditions"] if c["type"] == "InvalidSpec")["message"]
    api.set_pod_status("qa-bot-worker-1", "Failed", exit_code=1)
    wait_for(lambda: status(kubectl).get("restarts") == 1 and len(workers(cluster)) == 2
             and {p["metadata"]["labels"]["kubetune.io/attempt"] for p in workers(cluster).values()} == {"1"}, what="gang restarted")  # fmt: skip


def test_missing_secret_and_semantic_errors_give_invalid_spec_without_a_crash_loop(operator, cluster, api, kubectl, tmp_path):
    kubectl.apply(EXAMPLE)  # no credentials Secret yet
    st = wait_for(phase_is(kubectl, "Failed"))
    invalid = next(c for c in st["conditions"] if c["type"] == "InvalidSpec")
    assert "Secret 's3-credentials' not found" in invalid["message"]
    time.sleep(1)
    assert event_reasons(cluster).count("InvalidSpec") == 1 and not workers(cluster)
    api.create_secret("s3-credentials", CREDENTIALS)
    wait_for(lambda: len(workers(cluster)) == 2, what="workers once the Secret exists")
    assert not any(c["type"] == "InvalidSpec" for c in status(kubectl).get("conditions", []))

    bad = EXAMPLE.read_text().replace("name: qa-bot", "name: bad-gpus").replace("requests: {cpu: \"8\", memory: 64Gi}", "limits: {nvidia.com/gpu: 2}")
    (tmp_path / "bad.yaml").write_text(bad)
    kubectl.apply(tmp_path / "bad.yaml")
    st = wait_for(phase_is(kubectl, "Failed", "bad-gpus"))
    assert "spec.resources.limits.nvidia.com/gpu" in st["failure"] and st["failureReason"] == "InvalidSpec"


def test_delete_removes_children_even_without_garbage_collection(operator, cluster, api, kubectl):
    cluster.run(lambda e: setattr(e, "gc_enabled", False))
    start_job(api, kubectl, cluster)
    kubectl("delete", "ftj", "qa-bot", "--wait=false")
    wait_for(lambda: not cluster.objects("pods") and not cluster.objects("configmaps") and not cluster.objects("services"), what="children gone")
    wait_for(lambda: not cluster.objects("finetunejobs"), what="finalizer released")


def test_operator_restart_mid_job_creates_no_duplicates(operator, cluster, api, kubectl, operator_settings):
    start_job(api, kubectl, cluster)
    run_workers(api, cluster)
    wait_for(phase_is(kubectl, "Running"))
    operator.stop()
    api.delete("pods", "qa-bot-worker-1")  # lost while the operator was down
    restarted = Operator(cluster, operator_settings).start()
    try:
        wait_for(lambda: {p["metadata"]["labels"]["kubetune.io/attempt"] for p in workers(cluster).values()} == {"1"}
                 and len(workers(cluster)) == 2, what="gang replaced after restart")  # fmt: skip
        time.sleep(1.5)
        assert creates(cluster, "pods") == 4 and creates(cluster, "configmaps") == 1
        assert status(kubectl)["restarts"] == 1
    finally:
        restarted.stop()


def test_a_new_job_whose_children_partly_exist_gets_them_right(operator, cluster, api, kubectl):
    # A new job's first run creates without reading first; what already exists (here a stale
    # ConfigMap and the workers Service, as after a crash before the status patch) is kept or
    # corrected, never duplicated.
    api.request("POST", "/api/v1/namespaces/default/configmaps",
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "qa-bot-config"}, "data": {"job.yaml": "stale"}})  # fmt: skip
    api.request("POST", "/api/v1/namespaces/default/services",
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "qa-bot-workers"}, "spec": {"clusterIP": "None"}})  # fmt: skip
    start_job(api, kubectl, cluster)
    wait_for(lambda: "learningRate: 0.0001" in cluster.objects("configmaps")["qa-bot-config"]["data"]["job.yaml"], what="ConfigMap corrected")
    assert set(cluster.objects("services")) == {"qa-bot-workers"} and sorted(workers(cluster)) == list(WORKERS)
    assert wait_for(phase_is(kubectl, "Pending"))["startTime"]


def test_new_jobs_restarts_and_spec_changes_are_reconciled_without_waiting_for_the_timer(cluster, api, kubectl, operator_settings, monkeypatch):
    # An hour between timer runs: within this test's waits only the immediate paths can act
    # (the timer's first run when the operator sees a job, and the spec-change handler).
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    operator = Operator(cluster, dataclasses.replace(operator_settings, reconcile_interval=3600)).start()
    try:
        start_job(api, kubectl, cluster)  # a new job gets its children
        assert wait_for(phase_is(kubectl, "Pending"))["startTime"]
        assert "Created" in event_reasons(cluster)

        operator.stop()
        api.delete("pods", "qa-bot-worker-1")  # lost while the operator was down
        operator = Operator(cluster, operator.settings).start()
        wait_for(lambda: sorted(workers(cluster)) == list(WORKERS), what="the lost worker recreated on operator start")

        kubectl("patch", "ftj", "qa-bot", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
        wait_for(phase_is(kubectl, "Suspended"), what="Suspended after a spec change")
        wait_for(lambda: not workers(cluster), what="workers deleted")
        kubectl("patch", "ftj", "qa-bot", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
        wait_for(lambda: len(workers(cluster)) == 2, what="workers again after resuming")
        assert {"Suspended", "Resumed"} <= set(event_reasons(cluster))
    finally:
        operator.stop()


def test_training_done_merges_then_serves_and_exports_metrics(operator, cluster, api, kubectl, operator_settings):
    start_job(api, kubectl, cluster)
    for name in WORKERS:
        api.set_pod_status(name, "Succeeded", exit_code=0)
    wait_for(phase_is(kubectl, "Merging"))
    wait_for(lambda: "qa-bot-merge" in cluster.objects("pods"), what="merge pod")
    api.set_pod_status("qa-bot-merge", "Succeeded", exit_code=0)
    st = wait_for(phase_is(kubectl, "Serving"))
    assert st["endpoint"] == "http://qa-bot-serve.default.svc:8000/v1"
    assert st["outputs"] == {"adapterUri": "s3://models/qa-bot/adapter", "mergedUri": "s3://models/qa-bot/model"}
    wait_for(lambda: "qa-bot-serve" in cluster.objects("deployments") and "qa-bot-serve" in cluster.objects("services"), what="serving children")
    api.set_deployment_ready("qa-bot-serve", 1)
    st = wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in status(kubectl).get("conditions", [])) and status(kubectl))
    assert st["completionTime"]

    body = urllib.request.urlopen(f"http://127.0.0.1:{operator_settings.metrics_port}/metrics", timeout=5).read().decode()
    assert 'kubetune_operator_job_phase{name="qa-bot",namespace="default",phase="Serving"} 1.0' in body
    assert 'kubetune_operator_jobs{phase="Serving"} 1.0' in body
    assert 'kubetune_operator_reconcile_total{result="ok"}' in body
    assert "kubetune_operator_reconcile_duration_seconds_bucket" in body
    assert urllib.request.urlopen(f"http://127.0.0.1:{operator_settings.liveness_port}/healthz", timeout=5).status == 200

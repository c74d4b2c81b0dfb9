"""The real operator (its own process, the chart's ServiceAccount and RBAC) on the local
control plane, driven by the real kubectl applying examples/. No node runs these pods: the
test writes their status through the status subresource, as a kubelet would, and the
operator must follow. (A failed pod's log tail in the failure message needs a node serving
pods/log: tests/operator/test_e2e.py checks it.)"""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest
import yaml
from operator_harness import EXAMPLE, OperatorProcess, start_example, wait_for
from operator_harness import EXAMPLE_CREDENTIALS as CREDENTIALS

from kubetune.api.progress import Progress

JOB = "qa-bot"
WORKERS = (f"{JOB}-worker-0", f"{JOB}-worker-1")

pytestmark = pytest.mark.timeout(300)


def phase_is(ns, phase, name=JOB):
    return ns.phase_is(name, phase)


def attempts(ns) -> set[str]:
    return ns.attempts(JOB)


def children(ns, plural: str) -> set[str]:
    return {n for n in ns.objects(plural) if n.startswith(f"{JOB}-")}


def start_job(ns, kubectl):
    start_example(ns, kubectl)


def run_workers(ns):
    ns.run_workers(JOB)


def test_children_appear_once_and_status_follows_pod_phases(operator, ns, kubectl, audit):
    start_job(ns, kubectl)
    assert children(ns, "configmaps") == {f"{JOB}-config"} and children(ns, "services") == {f"{JOB}-workers"}
    pods = ns.workers(JOB)
    assert sorted(pods) == list(WORKERS)
    owner = pods[WORKERS[0]]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == kubectl.get_json("ftj", JOB)["metadata"]["uid"] and owner["controller"] is True
    assert wait_for(phase_is(ns, "Pending"))["startTime"]
    time.sleep(1.5)  # several reconcile cycles
    # Each child was created once, in one request each (a new job's children are created without reading first).
    creates = [e["objectRef"] for e in audit.events(operator.user) if e["verb"] == "create" and e["objectRef"].get("namespace") == ns.name]
    assert sorted(r["resource"] for r in creates if r["resource"] != "events") == ["configmaps", "pods", "pods", "services"]
    assert sorted(audit.created(operator.user, "pods", ns.name)) == list(WORKERS)

    ns.set_pod_status(WORKERS[0], "Running")
    time.sleep(0.8)
    assert ns.status(JOB)["phase"] == "Pending"  # the gang is not complete yet
    ns.set_pod_status(WORKERS[1], "Running")
    st = wait_for(phase_is(ns, "Running"), what="Running")
    assert st["observedGeneration"] == 1 and st["restarts"] == 0
    memory = next(c for c in st["conditions"] if c["type"] == "MemoryFits")  # smollm2-135m's shipped config
    assert memory["status"] == "True" and "of 64.0 GiB" in memory["message"]
    assert wait_for(lambda: ns.event_reasons(JOB)[:2] == ["Created", "Running"], what="events")
    # Every child was admitted by the namespace's `restricted` Pod Security Standard, and nothing secret leaks.
    assert "Forbidden" not in ns.event_reasons(JOB)
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(st) + json.dumps(ns.events(JOB))


def test_failed_worker_restarts_the_gang_then_backoff_limit_fails_the_job(operator, ns, kubectl):
    start_job(ns, kubectl)
    kubectl("patch", "ftj", JOB, "--type=merge", "-p", '{"spec":{"runPolicy":{"backoffLimit":1}}}')
    run_workers(ns)
    wait_for(phase_is(ns, "Running"))
    ns.set_pod_status(WORKERS[1], "Failed", exit_code=1)
    wait_for(lambda: attempts(ns) == {"1"} and len(ns.workers(JOB)) == 2, what="a new gang (attempt 1)")
    st = ns.status(JOB)
    assert st["restarts"] == 1 and st["lastFailedPod"] == WORKERS[1] and st["phase"] == "Restarting"
    assert "GangRestart" in ns.event_reasons(JOB)
    run_workers(ns)
    wait_for(phase_is(ns, "Running"))

    ns.set_pod_status(WORKERS[0], "Failed", exit_code=137)
    st = wait_for(phase_is(ns, "Failed"), what="Failed")
    assert st["failureReason"] == "BackoffLimitExceeded" and st["restarts"] == 1
    assert WORKERS[0] in st["failure"] and "exit code 137" in st["failure"]
    wait_for(lambda: not ns.workers(JOB), what="workers deleted")
    assert "BackoffLimitExceeded" in ns.event_reasons(JOB)
    time.sleep(1)
    assert not ns.workers(JOB)  # a failed job stays down


def test_invalid_input_exit_code_fails_without_retry(operator, ns, kubectl):
    start_job(ns, kubectl)
    run_workers(ns)
    ns.set_pod_status(WORKERS[0], "Failed", exit_code=64)
    st = wait_for(phase_is(ns, "Failed"))
    assert st["failureReason"] == "InvalidInput" and st["restarts"] == 0


def test_preempted_gang_restarts_without_counting_a_restart(operator, ns, kubectl):
    start_job(ns, kubectl)
    run_workers(ns)
    wait_for(phase_is(ns, "Running"))
    for name in WORKERS:  # SIGTERM: each committed a checkpoint and exited 75
        ns.set_pod_status(name, "Failed", exit_code=75)
    wait_for(lambda: attempts(ns) == {"1"} and len(ns.workers(JOB)) == 2, what="a new gang (attempt 1)")
    run_workers(ns)
    st = wait_for(phase_is(ns, "Running"))
    assert st["restarts"] == 0 and "BackoffLimitExceeded" not in ns.event_reasons(JOB)


def test_suspend_deletes_workers_and_resume_starts_them_again(operator, ns, kubectl):
    start_job(ns, kubectl)
    run_workers(ns)
    wait_for(phase_is(ns, "Running"))
    kubectl("patch", "ftj", JOB, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for(phase_is(ns, "Suspended"))
    wait_for(lambda: not ns.workers(JOB), what="workers deleted")
    assert children(ns, "configmaps") == {f"{JOB}-config"}  # the job document stays
    kubectl("patch", "ftj", JOB, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for(lambda: len(ns.workers(JOB)) == 2, what="workers again")
    run_workers(ns)
    st = wait_for(phase_is(ns, "Running"))
    assert st["restarts"] == 0
    assert {"Suspended", "Resumed"} <= set(ns.event_reasons(JOB))


def test_training_field_change_on_a_running_job_is_refused(operator, ns, kubectl):
    start_job(ns, kubectl)
    run_workers(ns)
    wait_for(phase_is(ns, "Running"))
    kubectl("patch", "ftj", JOB, "--type=merge", "-p", '{"spec":{"training":{"learningRate":0.001}}}')
    st = wait_for(lambda: any(c["type"] == "SpecChangeRefused" for c in ns.status(JOB).get("conditions", [])) and ns.status(JOB))
    refused = next(c for c in st["conditions"] if c["type"] == "SpecChangeRefused")
    assert "spec.training" in refused["message"] and st["phase"] == "Running"
    assert "learningRate: 0.0001" in ns.get("configmaps", f"{JOB}-config")["data"]["job.yaml"]
    assert st["observedGeneration"] == 2
    # A live spec that no longer parses (the CRD's schema accepts each field; the spec's own
    # cross-field rule refuses them together): reported, and the workers keep their spec.
    kubectl("patch", "ftj", JOB, "--type=merge", "-p", '{"spec":{"training":{"maxSourceLength":4096}}}')
    st = wait_for(lambda: any(c["type"] == "InvalidSpec" for c in ns.status(JOB).get("conditions", [])) and ns.status(JOB))
    assert "training.maxSourceLength (4096) must be smaller than training.maxLength" in next(c for c in st["conditions"] if c["type"] == "InvalidSpec")["message"]
    ns.set_pod_status(WORKERS[1], "Failed", exit_code=1)
    wait_for(lambda: ns.status(JOB).get("restarts") == 1 and len(ns.workers(JOB)) == 2 and attempts(ns) == {"1"}, what="gang restarted")


def test_missing_secret_and_semantic_errors_give_invalid_spec_without_a_crash_loop(operator, ns, kubectl, tmp_path):
    kubectl.apply(EXAMPLE)  # no credentials Secret yet
    st = wait_for(phase_is(ns, "Failed"))
    invalid = next(c for c in st["conditions"] if c["type"] == "InvalidSpec")
    assert "Secret 's3-credentials' not found" in invalid["message"]
    time.sleep(1)
    assert ns.event_reasons(JOB).count("InvalidSpec") == 1 and not ns.workers(JOB)
    ns.create_secret("s3-credentials", CREDENTIALS)
    wait_for(lambda: len(ns.workers(JOB)) == 2, what="workers once the Secret exists")
    # (the run that creates them writes the status after them)
    wait_for(lambda: not any(c["type"] == "InvalidSpec" for c in ns.status(JOB).get("conditions", [])), what="InvalidSpec cleared")

    bad = EXAMPLE.read_text().replace(f"name: {JOB}", "name: bad-gpus").replace('requests: {cpu: "8", memory: 64Gi}', "limits: {nvidia.com/gpu: 2}")
    (tmp_path / "bad.yaml").write_text(bad)
    kubectl.apply(tmp_path / "bad.yaml")
    st = wait_for(phase_is(ns, "Failed", "bad-gpus"))
    assert "spec.resources.limits.nvidia.com/gpu" in st["failure"] and st["failureReason"] == "InvalidSpec"


def test_delete_with_the_operator_running_removes_children_and_the_finalizer(operator, ns, kubectl):
    start_job(ns, kubectl)
    kubectl("delete", "ftj", JOB, "--wait=false")
    wait_for(lambda: not children(ns, "configmaps") and not children(ns, "services") and not ns.pods(JOB), what="children gone")
    wait_for(lambda: not ns.objects("finetunejobs"), what="finalizer released")
    assert "children deleted" in operator.log()


def test_without_the_operator_the_garbage_collector_removes_a_deleted_jobs_children(operator, ns, kubectl, kube_api):
    start_job(ns, kubectl)
    uid = kubectl.get_json("ftj", JOB)["metadata"]["uid"]
    owned = {(plural, n) for plural in ("pods", "configmaps", "services") for n in children(ns, plural)}
    assert len(owned) == 4
    operator.stop()  # e.g. `helm uninstall` before the jobs were deleted (README)
    kubectl("delete", "ftj", JOB, "--wait=false")
    kubectl("patch", "ftj", JOB, "--type=merge", "-p", '{"metadata":{"finalizers":[]}}')
    wait_for(lambda: not ns.objects("finetunejobs"), what="the job gone")
    # The real garbage collector follows the children's owner references to the vanished uid.
    wait_for(lambda: not any(ns.get(plural, n) for plural, n in owned), 120, "children collected")
    assert all(ns.get(plural, n) is None for plural, n in owned) and uid


def test_operator_restart_mid_job_creates_no_duplicates(operator, ns, kubectl, audit):
    start_job(ns, kubectl)
    run_workers(ns)
    wait_for(phase_is(ns, "Running"))
    config_uid = ns.get("configmaps", f"{JOB}-config")["metadata"]["uid"]
    operator.stop()
    ns.delete("pods", WORKERS[1])  # lost while the operator was down
    operator.start()
    wait_for(lambda: attempts(ns) == {"1"} and len(ns.workers(JOB)) == 2, what="gang replaced after restart")
    time.sleep(1.5)
    assert audit.created(operator.user, "pods", ns.name).count(WORKERS[0]) == 2  # attempt 0, then 1
    assert len(audit.created(operator.user, "pods", ns.name)) == 4 and audit.created(operator.user, "configmaps", ns.name) == [f"{JOB}-config"]
    assert ns.get("configmaps", f"{JOB}-config")["metadata"]["uid"] == config_uid
    assert ns.status(JOB)["restarts"] == 1


def test_a_new_job_whose_children_partly_exist_gets_them_right(operator, ns, kubectl, kube_api):
    # A new job's first run creates without reading first; what already exists (here a stale
    # ConfigMap and the workers Service, as after a crash before the status patch) is kept or
    # corrected, never duplicated.
    kube_api.create(f"/api/v1/namespaces/{ns.name}/configmaps",
                    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{JOB}-config"}, "data": {"job.yaml": "stale"}})  # fmt: skip
    kube_api.create(f"/api/v1/namespaces/{ns.name}/services",
                    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{JOB}-workers"}, "spec": {"clusterIP": "None"}})  # fmt: skip
    start_job(ns, kubectl)
    wait_for(lambda: "learningRate: 0.0001" in ns.get("configmaps", f"{JOB}-config")["data"]["job.yaml"], what="ConfigMap corrected")
    assert children(ns, "services") == {f"{JOB}-workers"} and sorted(ns.workers(JOB)) == list(WORKERS)
    assert wait_for(phase_is(ns, "Pending"))["startTime"]


@pytest.mark.parametrize("operator_options", [{"interval": "3600"}])
def test_new_jobs_restarts_and_spec_changes_are_reconciled_without_waiting_for_the_timer(operator, ns, kubectl):
    # An hour between timer runs: within this test's waits only the immediate paths can act
    # (the timer's first run when the operator sees a job, and the spec-change handler).
    start_job(ns, kubectl)  # a new job gets its children
    assert wait_for(phase_is(ns, "Pending"))["startTime"]
    assert "Created" in ns.event_reasons(JOB)

    operator.stop()
    ns.delete("pods", WORKERS[1])  # lost while the operator was down
    operator.start()
    wait_for(lambda: sorted(ns.workers(JOB)) == list(WORKERS), what="the lost worker recreated on operator start")

    kubectl("patch", "ftj", JOB, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for(phase_is(ns, "Suspended"), what="Suspended after a spec change")
    wait_for(lambda: not ns.workers(JOB), what="workers deleted")
    kubectl("patch", "ftj", JOB, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for(lambda: len(ns.workers(JOB)) == 2, what="workers again after resuming")
    assert {"Suspended", "Resumed"} <= set(ns.event_reasons(JOB))


def test_training_done_merges_then_serves_and_exports_metrics(operator, ns, kubectl):
    start_job(ns, kubectl)
    for name in WORKERS:
        ns.set_pod_status(name, "Succeeded", exit_code=0)
    wait_for(phase_is(ns, "Merging"))
    wait_for(lambda: ns.pods(JOB, "merge"), what="merge pod")
    ns.set_pod_status(f"{JOB}-merge", "Succeeded", exit_code=0)
    st = wait_for(phase_is(ns, "Serving"))
    assert st["endpoint"] == f"http://{JOB}-serve.{ns.name}.svc:8000/v1"
    assert st["outputs"] == {"adapterUri": "s3://models/qa-bot/adapter", "mergedUri": "s3://models/qa-bot/model"}
    wait_for(lambda: ns.get("deployments", f"{JOB}-serve") and ns.get("services", f"{JOB}-serve"), what="serving children")
    ns.make_ready(f"{JOB}-serve")  # the ReplicaSet controller's pod, reported Ready
    st = wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in ns.status(JOB).get("conditions", [])) and ns.status(JOB))
    assert st["completionTime"]

    body = operator.metrics()
    assert f'kubetune_operator_job_phase{{name="{JOB}",namespace="{ns.name}",phase="Serving"}} 1.0' in body
    assert 'kubetune_operator_reconcile_total{result="ok"}' in body
    assert "kubetune_operator_reconcile_duration_seconds_bucket" in body
    assert operator.healthy()


def test_status_writes_that_meet_a_newer_version_are_decided_again(operator, ns, kubectl, kube_api):
    """Status goes to the version of the job it was decided on (optimistic concurrency). The
    test keeps changing the job's labels (each a new resourceVersion) while the operator
    writes status transitions (preempted gangs restarting): its writes meet 409 Conflicts and
    go again to the newer version (only its labels changed), and the status still ends right:
    no transition lost or repeated."""
    start_job(ns, kubectl)
    stop = threading.Event()

    def relabel() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            kube_api.patch(f"/apis/kubetune.io/v1alpha1/namespaces/{ns.name}/finetunejobs/{JOB}", {"metadata": {"labels": {"touch": str(i)}}})
            time.sleep(0.01)

    thread = threading.Thread(target=relabel, daemon=True)
    thread.start()
    try:
        for attempt in range(1, 7):
            run_workers(ns)
            wait_for(phase_is(ns, "Running"))
            if conflicts(operator) > 0:
                break
            for name in WORKERS:
                ns.set_pod_status(name, "Failed", exit_code=75)
            wait_for(lambda: attempts(ns) == {str(attempt)} and len(ns.workers(JOB)) == 2, what=f"gang attempt {attempt}")
    finally:
        stop.set()
        thread.join(10)
    assert conflicts(operator) > 0
    assert "status not written, the job changed after resourceVersion" in operator.log()
    st = wait_for(phase_is(ns, "Running"))
    assert st["restarts"] == 0 and st["observedGeneration"] == 1 and ns.event_reasons(JOB).count("Created") == 1


def conflicts(operator: OperatorProcess) -> float:
    for line in operator.metrics().splitlines():
        if line.startswith("kubetune_operator_status_conflicts_total "):
            return float(line.split()[1])
    return 0.0


def test_probe_figures_reach_the_status_and_one_warning_event(operator, ns, kubectl, seaweed, s3_env, tmp_path):
    """spec.retention: the trainer writes its probe figures into progress.json (here the test
    writes them, as it writes the pods' status for the kubelet); the operator reads them from
    S3 with the job's credentials, puts them into status.retention and says once, with a
    Warning, that the tuned model kept less than spec.retention.probes.warnBelow."""
    from kubetune.artifacts.storage import open_store

    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = "kept"
    doc["spec"]["storage"]["endpoint"] = seaweed.endpoint
    doc["spec"]["checkpoint"]["uri"] = "s3://checkpoints/kept"
    doc["spec"]["retention"] = {"probes": {"warnBelow": 0.95}}
    (tmp_path / "kept.yaml").write_text(yaml.safe_dump(doc))
    ns.create_secret("s3-credentials", {k: v for k, v in seaweed.env.items() if k.startswith("AWS_") and "KEY" in k})
    kubectl.apply(tmp_path / "kept.yaml")
    wait_for(lambda: len(ns.workers("kept")) == 2, what="two workers")
    ns.run_workers("kept")
    wait_for(phase_is(ns, "Running", "kept"))
    lost = ["What is the capital of Italy?", "中国的首都是哪里？"]
    figures = {"probes": 94, "base_right": 36, "kept": 34, "kept_ratio": 0.9444, "warn_below": 0.95, "below_threshold": True, "lost": lost}
    progress = Progress(phase="exporting", step=40, total_steps=40, retention=figures)
    open_store("s3://checkpoints/kept").put_bytes("progress.json", progress.to_json())

    st = wait_for(lambda: ns.status("kept").get("retention") and ns.status("kept"), what="status.retention")
    assert st["retention"] == {"probes": 94, "baseRight": 36, "kept": 34, "keptRatio": 0.9444, "warnBelow": 0.95, "lost": lost}
    header, row = kubectl("get", "ftj", "kept", "-o", "wide").stdout.splitlines()
    assert row[header.index("KEPT") :].split()[0] == "0.9444"  # the Kept column (-o wide)
    wait_for(lambda: "KnowledgeLost" in ns.event_reasons("kept"), what="the KnowledgeLost Event")
    (event,) = [e for e in ns.events("kept") if e["reason"].startswith("Knowledge")]
    assert event["type"] == "Warning"
    assert event["message"] == ("34 of 36 probes the base model answered right are still right (94%), below spec.retention.probes.warnBelow 95%; "
                                "lost: What is the capital of Italy?; 中国的首都是哪里？")  # fmt: skip
    for name in ("kept-worker-0", "kept-worker-1"):  # training ends; later runs read the same figures
        ns.set_pod_status(name, "Succeeded", exit_code=0)
    wait_for(phase_is(ns, "Merging", "kept"))
    time.sleep(1.5)  # several reconcile cycles
    assert [e["reason"] for e in ns.events("kept") if e["reason"].startswith("Knowledge")] == ["KnowledgeLost"]
    assert ns.status("kept")["retention"]["kept"] == 34

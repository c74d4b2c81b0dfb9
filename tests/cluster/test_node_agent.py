"""The node agent with the real control plane: its Node and Lease, pods bound by the real
scheduler and run as local processes, status through the status subresource, logs through
the API server, env from Secrets, mounted ConfigMaps, pod DNS, graceful deletion, and a
Deployment whose pod comes from the real ReplicaSet controller and whose children the real
garbage collector removes."""

from __future__ import annotations

import base64
import sys
import urllib.request

import pytest

from kube_harness import wait_for

pytestmark = pytest.mark.timeout(180)

# What the `restricted` Pod Security Standard asks of every container.
RESTRICTED = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def container(command: list[str], name: str = "main", **fields) -> dict:
    return {"name": name, "image": "kubetune/test", "command": command, "securityContext": RESTRICTED, **fields}


def pod(name: str, command: list[str], **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container(command)], **spec}}  # fmt: skip


def pod_status(api, namespace, name) -> dict:
    return api.get(f"/api/v1/namespaces/{namespace}/pods/{name}").get("status") or {}


def test_node_registers_with_capacity_and_renews_its_lease(kube_api, node_agent):
    node = kube_api.get(f"/api/v1/nodes/{node_agent.name}")
    assert {k: node["status"]["allocatable"][k] for k in ("cpu", "memory", "nvidia.com/gpu")} == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "8"}
    assert [c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"] == ["True"]
    # The node-lifecycle controller lifts the not-ready taint that admission put on the new Node.
    wait_for(lambda: not kube_api.get(f"/api/v1/nodes/{node_agent.name}")["spec"].get("taints"), 60, "not-ready taint lifted")
    lease = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node_agent.name}"
    first = kube_api.get(lease)["spec"]["renewTime"]
    wait_for(lambda: kube_api.get(lease)["spec"]["renewTime"] != first, 30, "lease renewed")


def test_pods_run_report_exit_codes_and_logs(kube_api, kubectl, kube_namespace, node_agent):
    base = f"/api/v1/namespaces/{kube_namespace}"
    kube_api.create(f"{base}/secrets", {"metadata": {"name": "creds"}, "data": {"TOKEN": base64.b64encode(b"s3cr3t").decode()}})
    kube_api.create(f"{base}/configmaps", {"metadata": {"name": "cfg"}, "data": {"job.yaml": "hello: world\n"}})
    code = "import os,sys; print(open(sys.argv[1]).read().strip(), os.environ['TOKEN'], sys.argv[2])"
    ok = pod("ok", ["python", "-c", code, "/etc/cfg/job.yaml", "w-0.grp"], subdomain="grp",
             volumes=[{"name": "c", "configMap": {"name": "cfg"}}])  # fmt: skip
    ok["spec"]["containers"][0].update(env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}}],
                                       volumeMounts=[{"name": "c", "mountPath": "/etc/cfg"}])  # fmt: skip
    kube_api.create(f"{base}/pods", ok)
    kube_api.create(f"{base}/pods", pod("bad", ["python", "-c", "import sys; print('boom'); sys.exit(3)"]))
    wait_for(lambda: pod_status(kube_api, kube_namespace, "bad").get("phase") == "Failed", 60, "bad fails")
    wait_for(lambda: pod_status(kube_api, kube_namespace, "ok").get("phase") == "Succeeded", 60, "ok succeeds")
    bad = kube_api.get(f"{base}/pods/bad")
    assert bad["spec"]["nodeName"] == node_agent.name  # bound by the real scheduler
    assert bad["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert bad["status"]["podIP"] == "127.0.0.1"
    assert kubectl("logs", "ok").stdout == "hello: world s3cr3t 127.0.0.1\n"
    assert kube_api.get(f"{base}/pods/bad/log", tailLines=1) == "boom\n"


def test_a_missing_secret_keeps_the_pod_waiting_until_it_exists(kube_api, kube_namespace, node_agent):
    base = f"/api/v1/namespaces/{kube_namespace}"
    waiting = pod("waits", ["python", "-c", "import os; print(os.environ['KEY'])"])
    waiting["spec"]["containers"][0]["env"] = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "later", "key": "KEY"}}}]
    kube_api.create(f"{base}/pods", waiting)

    def reason():
        statuses = pod_status(kube_api, kube_namespace, "waits").get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"

    wait_for(reason, 60, "CreateContainerConfigError")
    kube_api.create(f"{base}/secrets", {"metadata": {"name": "later"}, "data": {"KEY": base64.b64encode(b"v").decode()}})
    wait_for(lambda: pod_status(kube_api, kube_namespace, "waits").get("phase") == "Succeeded", 60, "ran once the Secret exists")
    assert node_agent.log("waits") == "v\n"


def test_deleting_a_pod_stops_its_process_and_removes_it(kube_api, kube_namespace, node_agent):
    base = f"/api/v1/namespaces/{kube_namespace}"
    kube_api.create(f"{base}/pods", pod("sleeper", ["python", "-c", "import time; time.sleep(600)"], terminationGracePeriodSeconds=5))
    wait_for(lambda: pod_status(kube_api, kube_namespace, "sleeper").get("phase") == "Running", 60, "running")
    proc = node_agent.run("sleeper").containers[0].popen
    kube_api.delete(f"{base}/pods/sleeper")  # graceful: the agent stops it, then confirms the deletion
    wait_for(lambda: proc.poll() is not None, 30, "process stopped")
    wait_for(lambda: not kube_api.exists(f"{base}/pods/sleeper"), 30, "pod removed")
    assert proc.returncode == -15  # SIGTERM was enough


def test_deployment_pod_comes_from_the_replicaset_and_is_collected_with_its_owner(kube_api, kube_namespace, node_agent):
    code = ("import http.server, sys; http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[4])), "
            "http.server.SimpleHTTPRequestHandler).serve_forever()")
    web = container(["python", "-c", code, "--host", "0.0.0.0", "--port", "8000"], name="web",
                    ports=[{"containerPort": 8000}], readinessProbe={"httpGet": {"path": "/", "port": 8000}})  # fmt: skip
    apps = f"/apis/apps/v1/namespaces/{kube_namespace}"
    kube_api.create(f"{apps}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"terminationGracePeriodSeconds": 5, "containers": [web]}}},
    })  # fmt: skip
    wait_for(lambda: kube_api.get(f"{apps}/deployments/web").get("status", {}).get("readyReplicas") == 1, 90, "deployment ready")
    (replicaset,) = kube_api.get(f"{apps}/replicasets")["items"]
    (web_pod,) = kube_api.get(f"/api/v1/namespaces/{kube_namespace}/pods", labelSelector="app=web")["items"]
    assert [o["kind"] for o in replicaset["metadata"]["ownerReferences"]] == ["Deployment"]
    assert [(o["kind"], o["name"]) for o in web_pod["metadata"]["ownerReferences"]] == [("ReplicaSet", replicaset["metadata"]["name"])]
    assert urllib.request.urlopen(node_agent.service_url("web", 8000) + "/", timeout=5).status == 200
    proc = node_agent.run(web_pod["metadata"]["name"]).containers[0].popen

    kube_api.delete(f"{apps}/deployments/web", propagationPolicy="Background")
    wait_for(lambda: not kube_api.get(f"{apps}/replicasets")["items"], 60, "ReplicaSet collected")
    wait_for(lambda: not kube_api.get(f"/api/v1/namespaces/{kube_namespace}/pods")["items"], 60, "pod collected")
    assert proc.poll() is not None


def test_a_restarting_container_counts_its_restarts(kube_api, kube_namespace, node_agent):
    flaky = pod("flaky", ["python", "-c", "import sys; sys.exit(1)"], restartPolicy="OnFailure")
    kube_api.create(f"/api/v1/namespaces/{kube_namespace}/pods", flaky)

    def restarted():
        statuses = pod_status(kube_api, kube_namespace, "flaky").get("containerStatuses") or [{}]
        return statuses[0].get("restartCount", 0) >= 2 and statuses[0]

    status = wait_for(restarted, 60, "two restarts")
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert pod_status(kube_api, kube_namespace, "flaky")["phase"] == "Running"


def test_only_bound_pods_run(kube_api, kube_namespace, node_agent):
    """A pod that no node can hold stays Pending with the scheduler's reason; nothing runs."""
    greedy = pod("greedy", [sys.executable, "-c", "print('ran')"])
    greedy["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "9"}}
    kube_api.create(f"/api/v1/namespaces/{kube_namespace}/pods", greedy)

    def unschedulable():
        conditions = pod_status(kube_api, kube_namespace, "greedy").get("conditions") or []
        return [c for c in conditions if c["type"] == "PodScheduled" and c["reason"] == "Unschedulable"]

    (condition,) = wait_for(unschedulable, 60, "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in condition["message"]
    with pytest.raises(KeyError):
        node_agent.run("greedy")
    assert kube_api.get(f"/api/v1/namespaces/{kube_namespace}/pods/greedy/log") is None  # no node, no log


def test_init_containers_run_first_in_order_and_a_failed_one_fails_the_pod(kube_api, kube_namespace, node_agent):
    base = f"/api/v1/namespaces/{kube_namespace}"
    shared = [{"name": "work", "mountPath": "/work"}]
    # Container paths are rewritten where they are arguments (or env values), not inside code.
    write = "import sys; open(sys.argv[1], 'a').write(sys.argv[2])"
    staged = pod("staged", ["python", "-c", "import sys; print(open(sys.argv[1]).read())", "/work/order"],
                 volumes=[{"name": "work", "emptyDir": {}}],
                 initContainers=[container(["python", "-c", write, "/work/order", n], name=f"init-{n}", volumeMounts=shared) for n in "ab"])  # fmt: skip
    staged["spec"]["containers"][0]["volumeMounts"] = shared
    kube_api.create(f"{base}/pods", staged)
    broken = pod("broken", ["python", "-c", "print('never')"], initContainers=[container(["python", "-c", "raise SystemExit(7)"], name="init")])
    kube_api.create(f"{base}/pods", broken)
    wait_for(lambda: pod_status(kube_api, kube_namespace, "staged").get("phase") == "Succeeded", 60, "staged succeeds")
    assert node_agent.log("staged") == "ab\n"
    status = wait_for(lambda: pod_status(kube_api, kube_namespace, "broken").get("phase") == "Failed" and pod_status(kube_api, kube_namespace, "broken"), 60, "broken fails")
    assert status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    assert "waiting" in status["containerStatuses"][0]["state"] and node_agent.log("broken", container="main") == ""


def test_kubectl_logs_follow_streams_until_the_container_ends(kube_api, kubectl, kube_namespace, node_agent):
    slow = "import time\nfor i in range(4):\n    print('line', i, flush=True)\n    time.sleep(0.5)"
    kube_api.create(f"/api/v1/namespaces/{kube_namespace}/pods", pod("slow", ["python", "-c", slow]))
    wait_for(lambda: pod_status(kube_api, kube_namespace, "slow").get("phase") == "Running", 60, "running")
    followed = kubectl("logs", "--follow", "slow")  # returns once the container has exited
    assert followed.stdout == "".join(f"line {i}\n" for i in range(4))
    assert kubectl("logs", "--tail=1", "slow").stdout == "line 3\n"

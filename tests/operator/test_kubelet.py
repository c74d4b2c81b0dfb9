"""The kubelet harness itself, on trivial commands: phases, exit codes, logs, env from
Secrets, mounted ConfigMaps, pod DNS/port mapping and Deployment readiness."""

from __future__ import annotations

import os
import sys
import urllib.request

import pytest

from operator_harness import wait_for
from kubelet import Kubelet

pytestmark = pytest.mark.timeout(60)


def pod(name, command, **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "x", "command": command, **spec}]}}  # fmt: skip


@pytest.fixture
def kubelet(cluster, api, tmp_path):
    k = Kubelet(cluster, api, tmp_path / "node", dict(os.environ)).start()
    yield k
    k.stop()
    assert not k.errors


def phase(cluster, name):
    return (cluster.objects("pods")[name].get("status") or {}).get("phase")


def test_pods_run_report_exit_codes_and_logs(cluster, api, kubelet):
    api.create_secret("creds", {"TOKEN": "s3cr3t"})
    api.request("POST", "/api/v1/namespaces/default/configmaps",
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"job.yaml": "hello: world\n"}})  # fmt: skip
    code = "import os,sys; print(open(sys.argv[1]).read().strip(), os.environ['TOKEN'], sys.argv[2])"
    ok = pod("ok", ["python", "-c", code, "/etc/cfg/job.yaml", "w-0.grp"],
             env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}}],
             volumeMounts=[{"name": "c", "mountPath": "/etc/cfg"}])  # fmt: skip
    ok["spec"].update(subdomain="grp", volumes=[{"name": "c", "configMap": {"name": "cfg"}}])
    api.request("POST", "/api/v1/namespaces/default/pods", ok)
    api.request("POST", "/api/v1/namespaces/default/pods", pod("bad", ["python", "-c", "import sys; print('boom'); sys.exit(3)"]))
    wait_for(lambda: phase(cluster, "bad") == "Failed", what="bad fails")
    wait_for(lambda: phase(cluster, "ok") == "Succeeded", what="ok succeeds")
    bad = cluster.objects("pods")["bad"]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert bad["exitCode"] == 3
    log = urllib.request.urlopen(f"{cluster.url}/api/v1/namespaces/default/pods/ok/log").read().decode()
    assert "hello: world s3cr3t 127.0.0.1" in log
    assert "boom" in urllib.request.urlopen(f"{cluster.url}/api/v1/namespaces/default/pods/bad/log?tailLines=1").read().decode()


def test_deleting_a_pod_stops_its_process(cluster, api, kubelet):
    api.request("POST", "/api/v1/namespaces/default/pods", pod("sleeper", ["python", "-c", "import time; time.sleep(600)"]))
    wait_for(lambda: "sleeper" in kubelet.processes and phase(cluster, "sleeper") == "Running", what="running")
    proc = kubelet.processes["sleeper"].popen
    api.delete("pods", "sleeper")
    wait_for(lambda: proc.poll() is not None, what="process stopped")


def test_deployment_replica_becomes_ready_behind_its_service_port(cluster, api, kubelet):
    code = ("import http.server, sys; http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[4])), "
            "http.server.SimpleHTTPRequestHandler).serve_forever()")
    server = ["python", "-c", code, "--host", "0.0.0.0", "--port", "8000"]
    container = {"name": "web", "image": "x", "command": server, "ports": [{"containerPort": 8000}],
                 "readinessProbe": {"httpGet": {"path": "/", "port": 8000}}}  # fmt: skip
    api.request("POST", "/apis/apps/v1/namespaces/default/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [container]}}},
    })  # fmt: skip
    wait_for(lambda: (cluster.objects("deployments")["web"].get("status") or {}).get("readyReplicas") == 1, what="ready")
    assert urllib.request.urlopen(kubelet.service_url("web", 8000) + "/", timeout=5).status == 200

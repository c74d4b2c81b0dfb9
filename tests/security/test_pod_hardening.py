"""Every pod and container the operator can build, for every combination of the spec fields
that change the manifests (method, nodes, serving engine, auth, PVC locations, image and
placement overrides), is locked down: non-root, no privilege escalation, all capabilities
dropped, seccomp RuntimeDefault, no service-account token, nothing from the host, and S3 keys
only as Secret references. tests/security/test_operator_run.py checks the objects a running
operator really creates the same way (with `assert_hardened`).
"""

from __future__ import annotations

import ast
import itertools

import pytest

from kubetune.api.spec import parse_job
from kubetune_operator import builders
from kubetune_operator.settings import Settings

SETTINGS = Settings()
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
HOST_FIELDS = ("hostNetwork", "hostPID", "hostIPC")


def assert_hardened(pod_spec: dict, where: str) -> None:
    sc = pod_spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc.get("runAsUser", 1) != 0, where
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
    # No workload talks to the API server: no token in any pod.
    assert pod_spec["automountServiceAccountToken"] is False, where
    assert not any(pod_spec.get(f) for f in HOST_FIELDS), where
    assert all("hostPath" not in v for v in pod_spec.get("volumes", [])), where
    for container in pod_spec["containers"] + pod_spec.get("initContainers", []):
        at = f"{where} container {container['name']}"
        csc = container["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False, at
        assert csc["capabilities"] == {"drop": ["ALL"]}, at
        assert not csc.get("privileged"), at
        assert csc.get("runAsUser", 1) != 0 and csc.get("runAsNonRoot", True) is True, at
        assert csc["readOnlyRootFilesystem"] is True, at
        for env in container.get("env", []):
            if env["name"] in SECRET_ENV:
                assert set(env) == {"name", "valueFrom"} and set(env["valueFrom"]) == {"secretKeyRef"}, at


def pod_specs(manifests: list[dict]):
    for m in manifests:
        if m["kind"] == "Pod":
            yield f"Pod {m['metadata']['name']}", m["spec"]
        elif m["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{m['kind']} {m['metadata']['name']}", m["spec"]["template"]["spec"]


def children(job) -> list[dict]:
    out = [builders.build_config_map(job), builders.build_worker_service(job)]
    out += [builders.build_worker_pod(job, i, SETTINGS, attempt=1) for i in range(job.spec.distributed.nodes)]
    out += [builders.build_merge_pod(job, SETTINGS), builders.build_serving_deployment(job, SETTINGS), builders.build_serving_service(job)]
    return out


METHODS = ["lora", "full", "ptuning", "freeze"]
ENGINES = ["builtin", "vllm"]
VARIANTS = list(itertools.product(METHODS, ENGINES, [False, True], [1, 3]))


def variant(method: str, engine: str, extras: bool, nodes: int):
    spec = {
        "model": {"uri": "pvc://models/base" if extras else "s3://models/base"},
        "dataset": {"uri": "s3://data/qa.jsonl"},
        "method": {"type": method, **({"freeze": {"lastLayers": 2}} if method == "freeze" else {})},
        "distributed": {"nodes": nodes, "gpusPerNode": 2, "zero": {"stage": 3 if method == "full" else 2}},
        "output": {"uri": "s3://models/out"},
        "storage": {"endpoint": "http://minio:9000", "credentialsSecret": "s3-credentials"},
        "serving": {"enabled": True, "engine": "builtin" if method == "ptuning" else engine,
                    "resources": {"limits": {"nvidia.com/gpu": 1}}},
    }  # fmt: skip
    if extras:
        spec["serving"]["authSecret"] = "serve-token"
        spec["checkpoint"] = {"uri": "pvc://scratch/ckpt"}
        spec["image"] = {"trainer": "registry.example/trainer:1", "pullPolicy": "Always"}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}}  # fmt: skip
        spec["schedulerName"], spec["queueName"], spec["priorityClassName"] = "volcano", "q", "high"
    doc = {"metadata": {"name": "sec-test", "namespace": "team-a", "uid": "u-1", "generation": 1}, "spec": spec}
    return parse_job(doc)


@pytest.mark.parametrize("method, engine, extras, nodes", VARIANTS, ids=["-".join(map(str, v)) for v in VARIANTS])
def test_every_pod_and_container_is_hardened(method, engine, extras, nodes):
    job = variant(method, engine, extras, nodes)
    specs = list(pod_specs(children(job)))
    assert len(specs) == nodes + 2  # workers, merge pod, serving Deployment
    for where, spec in specs:
        assert_hardened(spec, where)


@pytest.mark.parametrize(
    "output",
    ["s3://models/x'); __import__('os').system('id'); ('", 's3://models/x"""\n\nimport os', "s3://models/a\\'b"],
)
def test_fetch_model_init_container_cannot_be_injected(output):
    # The vLLM pod's init container runs `python -c CODE` built from spec.output.uri.
    code = builders.fetch_model_command(output)[2]
    tree = ast.parse(code)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert len(calls) == 1 and calls[0].func.id == "fetch"
    assert [a.value for a in calls[0].args] == [output, builders.MODEL_MOUNT]

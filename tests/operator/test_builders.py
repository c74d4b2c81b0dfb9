"""Child manifests: valid Kubernetes objects with the contract's names, commands and safety."""

from __future__ import annotations

import pytest
import yaml
from operator_helpers import EXAMPLES, cluster_examples, example, k8s_validate

from kubetune.api import naming
from kubetune.api.spec import TRACKER_ENV, parse_job
from kubetune.artifacts.storage import pvc_mount_path
from kubetune_operator import builders
from kubetune_operator.settings import Settings

SETTINGS = Settings()
ALL_EXAMPLES = cluster_examples()


def children(job):
    out = [builders.build_config_map(job), builders.build_worker_service(job)]
    out += [builders.build_worker_pod(job, i, SETTINGS) for i in range(job.spec.distributed.nodes)]
    out += [builders.build_merge_pod(job, SETTINGS), builders.build_serving_deployment(job, SETTINGS), builders.build_serving_service(job)]
    return out


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_every_child_of_every_example_is_a_valid_kubernetes_object(name):
    job = example(name)
    for manifest in children(job):
        k8s_validate(manifest)
        meta = manifest["metadata"]
        assert meta["labels"][naming.JOB_LABEL] == job.metadata.name
        assert meta["ownerReferences"] == [builders.owner_reference(job)]
        assert meta["ownerReferences"][0]["uid"] == job.metadata.uid and meta["ownerReferences"][0]["controller"] is True


def pod_specs(job):
    for manifest in children(job):
        if manifest["kind"] == "Pod":
            yield manifest["spec"]
        elif manifest["kind"] == "Deployment":
            yield manifest["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_pods_run_non_root_without_privileges_and_secrets_only_by_reference(name):
    job = example(name)
    for spec in pod_specs(job):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            for env in container.get("env", []):
                if env["name"].startswith("AWS_") and env["name"] not in ("AWS_ENDPOINT_URL", "AWS_REGION"):
                    assert env["valueFrom"]["secretKeyRef"] == {"name": job.spec.storage.credentials_secret, "key": env["name"]}
                    assert "value" not in env


def test_worker_pod_follows_the_torchrun_contract():
    job = example("lora-multinode.yaml")
    pod = builders.build_worker_pod(job, 1, SETTINGS, attempt=2)
    assert pod["metadata"]["name"] == "qa-bot-worker-1"
    assert pod["metadata"]["labels"]["kubetune.io/role"] == "worker"
    assert pod["metadata"]["labels"]["kubetune.io/attempt"] == "2"
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    spec = pod["spec"]
    assert (spec["hostname"], spec["subdomain"], spec["restartPolicy"]) == ("qa-bot-worker-1", "qa-bot-workers", "Never")
    container = spec["containers"][0]
    assert container["command"] == [
        "python", "-m", "kubetune.train.launch", "--nnodes", "2", "--nproc_per_node", "4", "--node_rank", "1",
        "--master_addr", "qa-bot-worker-0.qa-bot-workers", "--master_port", "29500",
        "-m", "kubetune.train.main", "--job", "/etc/kubetune/job.yaml",
    ]  # fmt: skip
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_workload_service_account_and_pull_secrets_from_the_operator_settings():
    settings = Settings.from_env({"KUBETUNE_WORKLOAD_SERVICE_ACCOUNT": "kubetune-workload", "KUBETUNE_IMAGE_PULL_SECRETS": "regcred, other"})
    job = example("lora-multinode.yaml")
    for manifest in (builders.build_worker_pod(job, 0, settings), builders.build_merge_pod(job, settings)):
        assert manifest["spec"]["serviceAccountName"] == "kubetune-workload"
        assert manifest["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
        k8s_validate(manifest)
    template = builders.build_serving_deployment(job, settings)["spec"]["template"]["spec"]
    assert template["serviceAccountName"] == "kubetune-workload" and template["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in builders.build_worker_pod(job, 0, SETTINGS)["spec"]


def test_volcano_queue_placement_and_cpu_only_pods():
    job = example("full-zero3-offload.yaml")
    pod = builders.build_worker_pod(job, 0, SETTINGS)
    assert pod["metadata"]["annotations"] == {"scheduling.volcano.sh/queue-name": "research"}
    assert "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]
    assert (pod["spec"]["schedulerName"], pod["spec"]["priorityClassName"]) == ("volcano", "training-high")
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    cpu = builders.build_worker_pod(example("ptuning-cpu.yaml"), 0, SETTINGS)
    assert "nvidia.com/gpu" not in cpu["spec"]["containers"][0]["resources"]["limits"]


def test_kubernetes_validation_catches_a_broken_manifest():
    pod = builders.build_worker_pod(example("lora-multinode.yaml"), 0, SETTINGS)
    pod["spec"]["containers"][0]["resoures"] = {}
    with pytest.raises(Exception, match="resoures"):
        k8s_validate(pod)


def test_config_map_holds_the_job_the_trainer_reads():
    job = example("lora-multinode.yaml")
    cm = builders.build_config_map(job)
    doc = yaml.safe_load(cm["data"]["job.yaml"])
    assert doc["metadata"] == {"name": "qa-bot", "namespace": "default"}
    assert parse_job(doc).spec == job.spec
    assert builders.job_from_config_map(cm, job.metadata.model_dump()).spec == job.spec


def test_rendezvous_service_is_headless_and_selects_workers():
    svc = builders.build_worker_service(example("lora-multinode.yaml"))
    assert svc["metadata"]["name"] == "qa-bot-workers"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kubetune.io/job": "qa-bot", "kubetune.io/role": "worker"}


def test_merge_pod_runs_the_merge_step_without_gpus():
    pod = builders.build_merge_pod(example("lora-multinode.yaml"), SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["kubetune-train", "--job", "/etc/kubetune/job.yaml", "--merge"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_builtin_serving_serves_the_merged_model_with_probes():
    job = example("lora-multinode.yaml")
    deployment = builders.build_serving_deployment(job, SETTINGS)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["kubetune-serve", "--model", "s3://models/qa-bot/model"]
    assert "--base-model" not in container["command"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    assert deployment["spec"]["selector"]["matchLabels"] == {"kubetune.io/job": "qa-bot", "kubetune.io/role": "serve"}
    assert builders.endpoint_url(job) == "http://qa-bot-serve.default.svc:8000/v1"


def test_adapter_only_serving_passes_the_base_model_and_no_history():
    deployment = builders.build_serving_deployment(example("ptuning-cpu.yaml"), SETTINGS)
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--model") + 1] == "s3://models/faq-ptuning/adapter"
    assert command[command.index("--base-model") + 1] == "s3://models/smollm2-135m-instruct"
    assert "--no-history" in command


def test_vllm_serving_fetches_the_merged_model_with_our_image():
    job = example("qlora-vllm.yaml")
    pod = builders.build_serving_deployment(job, SETTINGS)["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["image"] == SETTINGS.trainer_image
    assert "s3://models/support-qlora/model" in init["command"][-1]
    vllm = pod["containers"][0]
    assert vllm["image"] == SETTINGS.vllm_image
    assert vllm["command"][vllm["command"].index("--model") + 1] == "/models/model"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # pvc:// model location -> the claim is mounted where kubetune.artifacts.storage looks.
    assert {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]


def test_tracker_settings_reach_the_workers_only_from_the_report_secret():
    doc = yaml.safe_load((EXAMPLES / "lora-multinode.yaml").read_text())
    doc["metadata"].update(namespace="default", uid="0b6a2c1e-5d1f-4c1a-9e1b-1234567890ab")
    doc["spec"]["training"].update(reportTo=["tensorboard", "wandb", "mlflow"], reportSecret="tracker-credentials")
    job = parse_job(doc)
    pod = builders.build_worker_pod(job, 0, SETTINGS)
    k8s_validate(pod)
    env = [e for e in pod["spec"]["containers"][0]["env"] if e["name"].startswith(("WANDB_", "MLFLOW_", "SWANLAB_"))]
    assert [e["name"] for e in env] == list(TRACKER_ENV["wandb"] + TRACKER_ENV["mlflow"])  # tensorboard needs none, swanlab not chosen
    for e in env:
        assert e == {"name": e["name"], "valueFrom": {"secretKeyRef": {"name": "tracker-credentials", "key": e["name"], "optional": True}}}
    # Merge and serving pods never see them; without reportSecret the workers do not either.
    for manifest in (builders.build_merge_pod(job, SETTINGS), builders.build_serving_deployment(job, SETTINGS)):
        assert "WANDB_API_KEY" not in yaml.safe_dump(manifest)
    doc["spec"]["training"].pop("reportSecret")
    assert "WANDB_API_KEY" not in yaml.safe_dump(builders.build_worker_pod(parse_job(doc), 0, SETTINGS))


def test_retention_files_on_volumes_are_mounted_in_the_workers():
    doc = yaml.safe_load((EXAMPLES / "lora-multinode.yaml").read_text())
    doc["metadata"].update(namespace="default", uid="0b6a2c1e-5d1f-4c1a-9e1b-1234567890ab")
    doc["spec"]["retention"] = {"replay": {"uri": "pvc://prompts/replay.jsonl"}, "probes": {"uri": "pvc://team-data/probes.jsonl"}}
    pod = builders.build_worker_pod(parse_job(doc), 0, SETTINGS)
    k8s_validate(pod)
    claims = {v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims) == {"prompts", "team-data"}
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {mounts[claims[c]] for c in claims} == {pvc_mount_path("prompts"), pvc_mount_path("team-data")}

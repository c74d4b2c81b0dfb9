"""Pure builders: one FineTuneJob -> the child manifests the operator creates.

No API calls here; `act.py` creates what these return. Names and labels come from
`kubetune.api.naming` (shared with the CLI). Every child is owned by the job (owner
reference), labelled `kubetune.io/job: NAME`, runs as non-root with all capabilities
dropped, and gets S3 and tracker credentials only through `secretKeyRef` (contract 9).
"""

from __future__ import annotations

from typing import Any, Optional

import yaml

from kubetune.api import spec as specmod
from kubetune.api.layout import JobLayout, job_layout
from kubetune.api.naming import (
    ATTEMPT_LABEL,
    CONFIG_ROLE,
    INDEX_LABEL,
    MERGE_ROLE,
    SERVE_ROLE,
    WORKER_ROLE,
    WORKERS_ROLE,
    config_map_name,
    merge_pod_name,
    selector,
    serve_name,
    worker_pod_name,
    workers_service_name,
)
from kubetune.api.spec import FineTuneJob, dump_job
from kubetune.api.uri import parse_uri
from kubetune.artifacts.storage import pvc_mount_path

from .settings import Settings

# libyaml's emitter and parser when PyYAML has them (same documents, several times faster:
# the operator writes a job.yaml per new job and reads one per run of every started job).
YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"

CONFIG_MOUNT = "/etc/kubetune"
JOB_FILE = f"{CONFIG_MOUNT}/job.yaml"
AUTH_MOUNT = "/etc/kubetune-auth"
MODEL_MOUNT = "/models"
MASTER_PORT = 29500
TRAINER_METRICS_PORT = 9400
RUN_AS = 1000
# Time for the trainer to finish a step and commit a checkpoint after SIGTERM.
WORKER_GRACE_SECONDS = 300


def master_addr(name: str) -> str:
    return f"{worker_pod_name(name, 0)}.{workers_service_name(name)}"


def endpoint_url(job: FineTuneJob) -> str:
    return f"http://{serve_name(job.metadata.name)}.{job.metadata.namespace}.svc:{job.spec.serving.port}/v1"


# ---------------------------------------------------------------------------------------
# shared pieces


def owner_reference(job: FineTuneJob) -> dict:
    return {
        "apiVersion": f"{specmod.API_GROUP}/{specmod.API_VERSION}",
        "kind": specmod.KIND,
        "name": job.metadata.name,
        "uid": getattr(job.metadata, "uid", None) or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(job: FineTuneJob, role: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/managed-by": "kubetune-operator",
        **selector(job.metadata.name, role),
        **extra,
    }


def metadata(job: FineTuneJob, name: str, role: str, **extra_labels: str) -> dict:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": labels(job, role, **extra_labels),
        "ownerReferences": [owner_reference(job)],
    }


POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "fsGroup": RUN_AS,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def storage_env(job: FineTuneJob) -> list[dict]:
    """S3 settings for a container; keys come only from the Secret (never the spec)."""
    env = [{"name": "KUBETUNE_JOB_NAME", "value": job.metadata.name}, {"name": "HOME", "value": "/tmp"}]
    storage = job.spec.storage
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
    if storage.credentials_secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}}})
    return env


def report_env(job: FineTuneJob) -> list[dict]:
    """The trackers' settings for the workers: only the keys each tracker in reportTo reads
    (spec.TRACKER_ENV), from training.reportSecret; optional, as a Secret need not hold them all."""
    training = job.spec.training
    if not training.report_secret:
        return []
    keys = [key for tracker in training.report_to for key in specmod.TRACKER_ENV[tracker]]
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": training.report_secret, "key": key, "optional": True}}} for key in keys]


def pvc_claims(job: FineTuneJob) -> list[str]:
    """PersistentVolumeClaims named by pvc:// locations, mounted at /mnt/pvc/CLAIM."""
    return sorted({parse_uri(uri, "/").bucket for _, uri in job.spec.locations() if uri.startswith("pvc://")})


def volumes(job: FineTuneJob, shm: bool) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): job file, scratch space, cache, /dev/shm, PVCs."""
    vols: list[dict] = [
        {"name": "job", "configMap": {"name": config_map_name(job.metadata.name)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts: list[dict] = [
        {"name": "job", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
    ]
    if shm:
        # NCCL and DataLoader workers need more shared memory than the 64 MiB default.
        vols.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    for i, claim in enumerate(pvc_claims(job)):
        vols.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{i}", "mountPath": pvc_mount_path(claim)})
    return vols, mounts


CACHE_ENV = [
    {"name": "KUBETUNE_CACHE_DIR", "value": "/cache/kubetune"},
    {"name": "XDG_CACHE_HOME", "value": "/cache"},
    {"name": "HF_HOME", "value": "/cache/huggingface"},
    {"name": "TORCH_EXTENSIONS_DIR", "value": "/cache/torch_extensions"},
    {"name": "PYTHONUNBUFFERED", "value": "1"},
]


def resources(spec: specmod.ResourceSpec, gpus: int) -> dict:
    """Requests/limits as written, with nvidia.com/gpu from gpusPerNode (0 = CPU-only nodes)."""
    limits = {k: str(v) for k, v in spec.limits.items()}
    requests = {k: str(v) for k, v in spec.requests.items()}
    limits.setdefault("nvidia.com/gpu", str(gpus))
    if limits["nvidia.com/gpu"] == "0":
        del limits["nvidia.com/gpu"]
        requests.pop("nvidia.com/gpu", None)
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def placement(job: FineTuneJob) -> dict:
    spec = job.spec
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = list(spec.tolerations)
    if spec.affinity:
        out["affinity"] = dict(spec.affinity)
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    if spec.scheduler_name:
        out["schedulerName"] = spec.scheduler_name
    return out


def queue_metadata(job: FineTuneJob) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) that put the pods in a Kueue or Volcano queue."""
    queue = job.spec.queue_name
    if not queue:
        return {}, {}
    if job.spec.scheduler_name == "volcano":
        return {}, {VOLCANO_QUEUE_ANNOTATION: queue}
    return {KUEUE_QUEUE_LABEL: queue}, {}


def trainer_image(job: FineTuneJob, settings: Settings) -> str:
    return job.spec.image.trainer or settings.trainer_image


def pull_policy(job: FineTuneJob, settings: Settings) -> str:
    return job.spec.image.pull_policy or settings.image_pull_policy


def pod_spec(settings: Settings, containers: list[dict], vols: list[dict], **extra: Any) -> dict:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Workloads never call the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": POD_SECURITY,
        "containers": containers,
        "volumes": vols,
        **extra,
    }
    if settings.workload_service_account:
        spec["serviceAccountName"] = settings.workload_service_account
    if settings.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    return spec


# ---------------------------------------------------------------------------------------
# children


def job_file_document(job: FineTuneJob) -> dict:
    """The job as the trainer reads it from /etc/kubetune/job.yaml (no status, no server fields)."""
    doc = dump_job(job)
    meta = doc["metadata"]
    doc["metadata"] = {"name": meta["name"], **({"namespace": meta["namespace"]} if meta.get("namespace") else {})}
    doc.pop("status", None)
    return doc


def build_config_map(job: FineTuneJob) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(job, config_map_name(job.metadata.name), CONFIG_ROLE),
        "data": {"job.yaml": yaml.dump(job_file_document(job), Dumper=YAML_DUMPER, sort_keys=False)},
    }


def build_worker_service(job: FineTuneJob) -> dict:
    """Headless Service giving worker pods DNS names (NAME-worker-0.NAME-workers) for torchrun."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, workers_service_name(name), WORKERS_ROLE),
        "spec": {
            "clusterIP": "None",
            # Rendezvous happens before pods are Ready.
            "publishNotReadyAddresses": True,
            "selector": selector(name, WORKER_ROLE),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }


def worker_command(job: FineTuneJob, index: int) -> list[str]:
    dist = job.spec.distributed
    # torchrun's arguments, through a launcher that keeps the trainer's exit code (64/74/75).
    return [
        "python", "-m", "kubetune.train.launch",
        "--nnodes", str(dist.nodes),
        "--nproc_per_node", str(dist.gpus_per_node),
        "--node_rank", str(index),
        "--master_addr", master_addr(job.metadata.name),
        "--master_port", str(MASTER_PORT),
        "-m", "kubetune.train.main",
        "--job", JOB_FILE,
    ]  # fmt: skip


def build_worker_pod(job: FineTuneJob, index: int, settings: Settings, attempt: int = 0) -> dict:
    name = job.metadata.name
    queue_labels, annotations = queue_metadata(job)
    meta = metadata(job, worker_pod_name(name, index), WORKER_ROLE, **{INDEX_LABEL: str(index), ATTEMPT_LABEL: str(attempt)}, **queue_labels)
    if annotations:
        meta["annotations"] = annotations
    vols, mounts = volumes(job, shm=True)
    env = storage_env(job) + report_env(job) + CACHE_ENV + [
        # Only rank 0 serves trainer metrics; every pod exposes the port for a PodMonitor.
        {"name": "KUBETUNE_METRICS_PORT", "value": str(TRAINER_METRICS_PORT)},
        {"name": "KUBETUNE_NODE_RANK", "value": str(index)},
    ]
    if settings.trainer_final_scrape_seconds > 0:
        env.append({"name": "KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS", "value": f"{settings.trainer_final_scrape_seconds:g}"})
    container = {
        "name": "trainer",
        "image": trainer_image(job, settings),
        "imagePullPolicy": pull_policy(job, settings),
        "command": worker_command(job, index),
        "env": env,
        "ports": [
            {"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": resources(job.spec.resources, job.spec.distributed.gpus_per_node),
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": pod_spec(
            settings,
            [container],
            vols,
            hostname=worker_pod_name(name, index),
            subdomain=workers_service_name(name),
            terminationGracePeriodSeconds=WORKER_GRACE_SECONDS,
            **placement(job),
        ),
    }


def build_merge_pod(job: FineTuneJob, settings: Settings) -> dict:
    """Merges the LoRA adapter into the base model (CPU is enough: no GPU requested)."""
    vols, mounts = volumes(job, shm=False)
    container = {
        "name": "merge",
        "image": trainer_image(job, settings),
        "imagePullPolicy": pull_policy(job, settings),
        "command": ["kubetune-train", "--job", JOB_FILE, "--merge"],
        "env": storage_env(job) + CACHE_ENV,
        "resources": resources(job.spec.resources, 0),
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
    }
    spec = placement(job)
    spec.pop("schedulerName", None)  # a single pod needs no gang scheduler
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(job, merge_pod_name(job.metadata.name), MERGE_ROLE),
        "spec": pod_spec(settings, [container], vols, **spec),
    }


def serve_command(job: FineTuneJob, layout: JobLayout) -> list[str]:
    serving = job.spec.serving
    command = ["kubetune-serve", "--model", str(layout.serving_model)]
    if layout.model is None:  # an adapter served on its base
        command += ["--base-model", job.spec.model.uri]
    command += ["--host", "0.0.0.0", "--port", str(serving.port), "--job", JOB_FILE,
                "--served-model-name", job.metadata.name]  # fmt: skip
    if not serving.history:
        command.append("--no-history")
    if serving.auth_secret:
        command += ["--token-file", f"{AUTH_MOUNT}/token"]
    return command


def fetch_model_command(uri: str) -> list[str]:
    """Init container of the vLLM pod: our image copies the merged model to a shared volume."""
    code = f"from kubetune.artifacts.storage import fetch; fetch({uri!r}, {MODEL_MOUNT!r})"
    return ["python", "-c", code]


def build_serving_deployment(job: FineTuneJob, settings: Settings) -> dict:
    name = job.metadata.name
    serving = job.spec.serving
    layout = job_layout(job)
    vols, mounts = volumes(job, shm=serving.engine == "vllm")
    probe_port = serving.port
    gpus = int(str(serving.resources.limits.get("nvidia.com/gpu", 0)))
    init_containers = []
    if serving.engine == "vllm":
        vols.append({"name": "models", "emptyDir": {}})
        model_mount = {"name": "models", "mountPath": MODEL_MOUNT}
        local_model = f"{MODEL_MOUNT}/{layout.serving_model.name}"
        init_containers.append(
            {
                "name": "fetch-model",
                "image": trainer_image(job, settings),
                "imagePullPolicy": pull_policy(job, settings),
                "command": fetch_model_command(str(layout.serving_model)),
                "env": storage_env(job),
                "volumeMounts": mounts + [model_mount],
                "securityContext": CONTAINER_SECURITY,
            }
        )
        container = {
            "name": "vllm",
            "image": job.spec.image.vllm or settings.vllm_image,
            "imagePullPolicy": pull_policy(job, settings),
            "command": ["python3", "-m", "vllm.entrypoints.openai.api_server",
                        "--model", local_model, "--served-model-name", name,
                        "--host", "0.0.0.0", "--port", str(serving.port)],  # fmt: skip
            "env": CACHE_ENV + [{"name": "HOME", "value": "/tmp"}],
            "volumeMounts": mounts + [model_mount],
            "readinessProbe": {"httpGet": {"path": "/health", "port": probe_port}, "periodSeconds": 10},
            "livenessProbe": {"httpGet": {"path": "/health", "port": probe_port}, "initialDelaySeconds": 300, "periodSeconds": 30},
        }
    else:
        container = {
            "name": "serve",
            "image": job.spec.image.serving or trainer_image(job, settings),
            "imagePullPolicy": pull_policy(job, settings),
            "command": serve_command(job, layout),
            "env": storage_env(job) + CACHE_ENV,
            "volumeMounts": mounts,
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": probe_port}, "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": probe_port}, "initialDelaySeconds": 30, "periodSeconds": 20},
        }
        if serving.auth_secret:
            vols.append({"name": "auth", "secret": {"secretName": serving.auth_secret, "items": [{"key": "token", "path": "token"}]}})
            container["volumeMounts"] = mounts + [{"name": "auth", "mountPath": AUTH_MOUNT, "readOnly": True}]
    container.update(
        ports=[{"name": "http", "containerPort": serving.port, "protocol": "TCP"}],
        resources=resources(serving.resources, gpus),
        securityContext=CONTAINER_SECURITY,
    )
    spec = placement(job)
    spec.pop("schedulerName", None)
    pod = pod_spec(settings, [container], vols, **spec)
    pod["restartPolicy"] = "Always"
    if init_containers:
        pod["initContainers"] = init_containers
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(job, serve_name(name), SERVE_ROLE),
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": selector(name, SERVE_ROLE)},
            "template": {"metadata": {"labels": labels(job, SERVE_ROLE)}, "spec": pod},
        },
    }


def build_serving_service(job: FineTuneJob) -> dict:
    name = job.metadata.name
    port = job.spec.serving.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, serve_name(name), SERVE_ROLE),
        "spec": {
            "selector": selector(name, SERVE_ROLE),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def job_from_config_map(config_map: dict, metadata: dict) -> Optional[FineTuneJob]:
    """The job the workers were started with (the ConfigMap's copy), with the live metadata."""
    text = (config_map.get("data") or {}).get("job.yaml")
    if not text:
        return None
    doc = yaml.load(text, Loader=YAML_LOADER)
    doc["metadata"] = metadata
    return specmod.parse_job(doc, f"ConfigMap {config_map['metadata']['name']}")

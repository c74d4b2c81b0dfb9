"""The Helm chart rendered by the real Helm v4 engine (helm-python-sdk): every toggle
combination renders objects that pass kubernetes-validate --strict (built-in kinds) or the
prometheus-operator schemas (monitoring kinds), lint is clean in strict mode, and bad values
are rejected by values.schema.json with a message naming the key."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from monitoring_schemas import SCHEMAS

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
RELEASE, NAMESPACE = "kt", "kubetune-system"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest known.
KUBE_VERSIONS = ("1.25", kubernetes_validate.latest_version())
TOGGLES = ("serviceMonitor", "podMonitor", "prometheusRule", "dashboards")
TOGGLE_KINDS = {"serviceMonitor": "ServiceMonitor", "podMonitor": "PodMonitor", "prometheusRule": "PrometheusRule"}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values=None) -> list[dict]:
    manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [obj for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for obj in yaml.safe_load_all(text) if obj]


def monitoring_values(**enabled: bool) -> dict:
    return {"monitoring": {toggle: {"enabled": enabled.get(toggle, False)} for toggle in TOGGLES}}


def one(objects, kind, name=None, namespace=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
             and (namespace is None or o["metadata"].get("namespace") == namespace)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}, got {len(found)}"
    return found[0]


_VALID: set[str] = set()  # objects already validated (toggle combinations repeat most objects)


def validate(obj: dict) -> None:
    key = json.dumps(obj, sort_keys=True)
    if key in _VALID:
        return
    _validate(obj)
    _VALID.add(key)


def _validate(obj: dict) -> None:
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(obj, SCHEMAS[obj["kind"]])
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def operator_container(objects) -> dict:
    deployment = one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container) -> dict:
    return {e["name"]: e.get("value") for e in container["env"]}


# --- defaults ---------------------------------------------------------------------------


def test_default_install_runs_one_hardened_operator_with_kopf_liveness(chart):
    objects = render(chart)
    deployment = one(objects, "Deployment", f"{RELEASE}-kubetune", NAMESPACE)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(objects)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]

    assert container["command"] == ["python", "-m", "kubetune_operator"]
    env = env_of(container)
    assert env["KUBETUNE_WATCH_NAMESPACES"] == ""  # every namespace
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == int(env["KUBETUNE_OPERATOR_LIVENESS_PORT"]) == 8080
    assert ports["metrics"] == int(env["KUBETUNE_OPERATOR_METRICS_PORT"]) == 8081
    # The metrics Service reaches the metrics port of exactly these pods.
    service = one(objects, "Service", f"{RELEASE}-kubetune-metrics")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    # The image tag defaults to the chart's appVersion.
    assert container["image"] == f"ghcr.io/kubetune/kubetune-operator:{chart.metadata['appVersion']}"


def test_operator_reads_the_images_and_ports_the_chart_gives_it(chart):
    from kubetune_operator.settings import Settings

    values = {"images": {"trainer": {"repository": "registry.local:5000/kt/trainer", "tag": "v9", "pullPolicy": "Always"},
                         "vllm": {"repository": "registry.local:5000/vllm", "tag": "v1"}},
              "operator": {"metricsPort": 9090, "healthPort": 9091}}
    container = operator_container(render(chart, values))
    settings = Settings.from_env(env_of(container))
    assert settings.trainer_image == "registry.local:5000/kt/trainer:v9"
    assert settings.vllm_image == "registry.local:5000/vllm:v1"
    assert settings.image_pull_policy == "Always"
    assert settings.metrics_port == 9090 and settings.liveness_port == 9091
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[container["livenessProbe"]["httpGet"]["port"]] == 9091 and ports["metrics"] == 9090


def test_default_install_is_cluster_wide_with_kopf_and_app_permissions_split(chart):
    objects = render(chart)
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding")]
    kopf = one(objects, "ClusterRole", f"{RELEASE}-kubetune-kopf")
    app = one(objects, "ClusterRole", f"{RELEASE}-kubetune-app")
    assert grants(kopf, "apiextensions.k8s.io", "customresourcedefinitions") == {"list", "watch"}
    assert grants(kopf, "", "namespaces") == {"list", "watch"}
    assert grants(app, "apiextensions.k8s.io", "customresourcedefinitions") == set()
    for role in ("kopf", "app"):
        binding = one(objects, "ClusterRoleBinding", f"{RELEASE}-kubetune-{role}")
        assert binding["roleRef"]["name"] == f"{RELEASE}-kubetune-{role}"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-kubetune", "namespace": NAMESPACE}]
    one(objects, "ServiceAccount", f"{RELEASE}-kubetune", NAMESPACE)
    workload = one(objects, "ServiceAccount", "kubetune-workload", NAMESPACE)
    assert workload["automountServiceAccountToken"] is False


def grants(role: dict, group: str, resource: str) -> set[str]:
    return {verb for rule in role["rules"] if group in rule["apiGroups"] and resource in rule["resources"]
            for verb in rule["verbs"]}


# What the operator does with each resource (kubetune_operator.kube.CALLS plus kopf's own
# watch and patches), and nothing beyond it.
APP_PERMISSIONS = {
    ("kubetune.io", "finetunejobs"): {"list", "watch", "patch"},
    ("kubetune.io", "finetunejobs/status"): {"patch"},
    ("", "pods"): {"list", "create", "delete"},
    ("", "services"): {"get", "create", "delete"},
    ("", "configmaps"): {"get", "create", "patch", "delete"},
    ("", "pods/log"): {"get"},
    ("apps", "deployments"): {"get", "create", "patch", "delete"},
    ("", "secrets"): {"get"},
}


@pytest.mark.parametrize("watch", [[], ["team-a"]], ids=["cluster", "namespaced"])
def test_app_role_grants_exactly_what_the_operator_needs(chart, watch):
    objects = render(chart, {"watchNamespaces": watch})
    app = one(objects, "Role" if watch else "ClusterRole", f"{RELEASE}-kubetune-app")
    granted = {(group, resource): grants(app, group, resource)
               for rule in app["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    assert granted == APP_PERMISSIONS
    kopf = one(objects, "Role" if watch else "ClusterRole", f"{RELEASE}-kubetune-kopf")
    assert grants(kopf, "", "events") == {"create"}


def test_namespaced_mode_uses_roles_in_each_watched_namespace_only(chart):
    watched = ["team-a", "team-b"]
    objects = render(chart, {"watchNamespaces": watched, **monitoring_values(podMonitor=True)})
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for namespace in watched:
        for role in ("kopf", "app"):
            one(objects, "Role", f"{RELEASE}-kubetune-{role}", namespace)
            binding = one(objects, "RoleBinding", f"{RELEASE}-kubetune-{role}", namespace)
            assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{RELEASE}-kubetune-{role}"}
            assert binding["subjects"][0]["namespace"] == NAMESPACE
        assert one(objects, "ServiceAccount", "kubetune-workload", namespace)["automountServiceAccountToken"] is False
    assert {o["metadata"]["namespace"] for o in objects if o["kind"] in ("Role", "RoleBinding")} == set(watched)
    assert env_of(operator_container(objects))["KUBETUNE_WATCH_NAMESPACES"] == "team-a,team-b"
    for monitor in (o for o in objects if o["kind"] == "PodMonitor"):
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": watched}


# --- every toggle combination -------------------------------------------------------------

COMBINATIONS = [dict(zip(TOGGLES, flags)) for flags in itertools.product((False, True), repeat=len(TOGGLES))]


@pytest.mark.parametrize("toggles", COMBINATIONS, ids=lambda t: "+".join(k for k, v in t.items() if v) or "none")
@pytest.mark.parametrize("watch", [[], ["team-a", "team-b"]], ids=["cluster", "namespaced"])
def test_every_toggle_combination_renders_valid_objects(chart, toggles, watch):
    objects = render(chart, {"watchNamespaces": watch, **monitoring_values(**toggles)})
    kinds = {o["kind"] for o in objects}
    for toggle, kind in TOGGLE_KINDS.items():
        assert (kind in kinds) == toggles[toggle], kind
    dashboards = [o for o in objects if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]]
    assert bool(dashboards) == toggles["dashboards"]
    names = set()
    for obj in objects:
        validate(obj)
        scoped = obj["kind"] not in CLUSTER_SCOPED
        assert ("namespace" in obj["metadata"]) == scoped, obj["metadata"]["name"]
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in names, f"{key} rendered twice"
        names.add(key)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["team-a"], **monitoring_values(**dict.fromkeys(TOGGLES, True))}],
                         ids=["defaults", "everything-on"])
def test_lint_strict_is_clean(values):
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_notes_tell_the_user_what_to_do_next(chart):
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["kubetune/templates/NOTES.txt"]
    assert f"rollout status deployment/{RELEASE}-kubetune" in notes
    assert "create secret generic" in notes and "AWS_ACCESS_KEY_ID" in notes
    assert "kubectl apply -f job.yaml" in notes
    assert "every namespace" in notes
    namespaced = chart.render({"watchNamespaces": ["team-a"]}, name=RELEASE, namespace=NAMESPACE)["kubetune/templates/NOTES.txt"]
    assert "watches these namespaces only: team-a" in namespaced


# --- monitoring objects ----------------------------------------------------------------


def test_prometheus_rule_embeds_the_rules_file_unchanged(chart):
    objects = render(chart, monitoring_values(prometheusRule=True))
    rule = one(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())


def test_dashboards_become_configmaps_with_the_grafana_sidecar_label(chart):
    files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert len(files) >= 3
    objects = render(chart, {"monitoring": {"dashboards": {"enabled": True, "namespace": "monitoring"}}})
    maps = [o for o in objects if o["kind"] == "ConfigMap"]
    assert len(maps) == len(files)
    for path in files:
        (cm,) = [m for m in maps if path.name in m["data"]]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "monitoring"
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())


def test_monitoring_schemas_reject_what_prometheus_operator_rejects(chart):
    monitor = one(render(chart, monitoring_values(podMonitor=True)), "PodMonitor", f"{RELEASE}-kubetune-worker")
    misspelt = {**monitor, "spec": {**monitor["spec"], "podMetricEndpoints": monitor["spec"]["podMetricsEndpoints"]}}
    with pytest.raises(jsonschema.ValidationError, match="podMetricEndpoints"):
        _validate(misspelt)
    endpoint = {**monitor["spec"]["podMetricsEndpoints"][0], "interval": "15 s"}
    with pytest.raises(jsonschema.ValidationError, match="15 s"):
        _validate({**monitor, "spec": {**monitor["spec"], "podMetricsEndpoints": [endpoint]}})


def test_service_monitor_keeps_the_jobs_namespace_label(chart):
    monitor = one(render(chart, monitoring_values(serviceMonitor=True)), "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_pod_monitors_select_the_pods_and_ports_the_operator_builds(chart):
    """The PodMonitors' label selectors and port names match real worker pods and serving
    Deployments from kubetune_operator.builders, so Prometheus finds them."""
    from kubetune.api import naming
    from kubetune.api.spec import load_job
    from kubetune_operator import builders
    from kubetune_operator.settings import Settings

    job = load_job(REPO / "examples" / "lora-multinode.yaml")
    assert job.spec.serving.enabled and job.spec.serving.engine == "builtin"
    objects = render(chart, monitoring_values(podMonitor=True))
    settings = Settings.from_env(env_of(operator_container(objects)))
    pod_templates = {
        "worker": builders.build_worker_pod(job, 0, settings),
        "serve": builders.build_serving_deployment(job, settings)["spec"]["template"],
    }
    # A finished trainer waits for one more scrape (at most finalScrapeSeconds) before it exits,
    # so the final figures reach Prometheus; without PodMonitors it exits at once.
    assert env_of(pod_templates["worker"]["spec"]["containers"][0])["KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS"] == "30"
    unmonitored = Settings.from_env(env_of(operator_container(render(chart))))
    assert "KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS" not in env_of(builders.build_worker_pod(job, 0, unmonitored)["spec"]["containers"][0])
    monitors = [o for o in objects if o["kind"] == "PodMonitor"]
    assert len(monitors) == len(pod_templates)
    for monitor in monitors:
        matched = [role for role, pod in pod_templates.items()
                   if monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()]
        assert len(matched) == 1, monitor["metadata"]["name"]
        pod = pod_templates[matched[0]]
        port_names = {p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in port_names
        relabel = endpoint["relabelings"][0]
        assert relabel["targetLabel"] == "finetunejob"
        # __meta_kubernetes_pod_label_<name> uses the label name with every non [a-z0-9_] as "_".
        assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_label_" + naming.JOB_LABEL.replace(".", "_").replace("/", "_")]
        assert pod["metadata"]["labels"][naming.JOB_LABEL] == job.metadata.name


# --- CRDs ----------------------------------------------------------------------------------


def test_chart_crds_are_the_generated_crds(chart):
    """charts/kubetune/crds/ is a copy of crds/ (generated from the spec model): refresh it with
    `cp crds/*.yaml charts/kubetune/crds/` whenever `make crds` changes them."""
    generated = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert generated, "crds/ holds no CRD yet (make crds)"
    copied = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert copied == generated
    for name in generated:
        assert (CHART / "crds" / name).read_text() == (REPO / "crds" / name).read_text(), f"charts/kubetune/crds/{name} is stale"
    assert sorted(c["filename"] for c in chart.crds) == [f"kubetune/crds/{n}" for n in generated]
    for crd in chart.crds:
        for obj in yaml.safe_load_all(crd["data"]):
            if obj:
                validate(obj)


# --- values.schema.json ------------------------------------------------------------------------

BAD_VALUES = [
    ({"operator": {"metricsPort": 70000}}, "at '/operator/metricsPort': maximum: got 70,000, want 65,535"),
    ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0': 'Team_A' does not match pattern"),
    ({"watchNamespaces": ["a", "a"]}, "at '/watchNamespaces': items at 0 and 1 are equal"),
    ({"replicaCount": 2}, "at '': additional properties 'replicaCount' not allowed"),
    ({"images": {"operator": {"pullPolicy": "Sometimes"}}}, "at '/images/operator/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
    ({"monitoring": {"serviceMonitor": {"enabled": "yes"}}}, "at '/monitoring/serviceMonitor/enabled': got string, want boolean"),
    ({"monitoring": {"podMonitor": {"interval": "15 seconds"}}}, "at '/monitoring/podMonitor/interval': '15 seconds' does not match pattern"),
    ({"monitoring": {"podMonitor": {"finalScrapeSeconds": -5}}}, "at '/monitoring/podMonitor/finalScrapeSeconds': minimum: got -5, want 0"),
    ({"operator": {"resources": {"limits": {"memory": "lots"}}}}, "at '/operator/resources/limits/memory': 'lots' does not match pattern"),
    ({"workloadServiceAccount": {"name": "Trainer Pods"}}, "at '/workloadServiceAccount/name': 'Trainer Pods' does not match pattern"),
    ({"images": {"trainer": {"tag": None}}}, "at '/images/trainer': missing property 'tag'"),
]


@pytest.mark.parametrize("values,message", BAD_VALUES, ids=[m.split(":")[0] for _, m in BAD_VALUES])
def test_bad_values_fail_at_render_with_the_key_named(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(caught.value)


def test_schema_accepts_the_chart_defaults_and_documented_overrides(chart):
    chart.validate_schema({
        "watchNamespaces": ["team-a"],
        "images": {"operator": {"repository": "registry.local:5000/kubetune/operator", "tag": "0.2.0-rc.1"}},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"resources": {"requests": {"cpu": 0.5, "memory": "256Mi"}}, "extraEnv": [{"name": "X", "value": "1"}]},
        "monitoring": {"serviceMonitor": {"enabled": True, "interval": "1m30s", "labels": {"release": "prom"}}},
    })
    container = operator_container(render(chart, {"imagePullSecrets": [{"name": "a"}, {"name": "b"}]}))
    assert env_of(container)["KUBETUNE_IMAGE_PULL_SECRETS"] == "a,b"

"""`kubetune list|status|logs`: FineTuneJobs on a cluster, over kubeconfig (kubernetes client)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from ..api.naming import SERVE_ROLE, merge_pod_name, selector_text, worker_pod_name
from ..api.spec import API_GROUP, API_VERSION, PLURAL


def _clients(args):
    from kubernetes import client, config

    config.load_kube_config(config_file=args.kubeconfig, context=args.context)
    namespace = args.namespace
    if not namespace:
        _, active = config.list_kube_config_contexts(config_file=args.kubeconfig)
        if args.context:
            contexts, _ = config.list_kube_config_contexts(config_file=args.kubeconfig)
            active = next((c for c in contexts if c["name"] == args.context), active)
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
    return client.CustomObjectsApi(), client.CoreV1Api(), namespace


def age(timestamp: Optional[str], now: Optional[datetime] = None) -> str:
    if not timestamp:
        return "-"
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.now(timezone.utc)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def job_row(job: dict[str, Any], now: Optional[datetime] = None) -> dict[str, str]:
    """One line of `kubetune list` from a FineTuneJob object (pure)."""
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    spec = job.get("spec") or {}
    step, total = progress.get("step"), progress.get("totalSteps")
    loss = status.get("loss")
    return {
        "namespace": job["metadata"].get("namespace", ""),
        "name": job["metadata"]["name"],
        "phase": status.get("phase") or "Pending",
        "method": (spec.get("method") or {}).get("type", "lora"),
        "progress": f"{step}/{total} ({progress.get('percent', 0):g}%)" if total else "-",
        "loss": f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
        "restarts": str(status.get("restarts", 0)),
        "endpoint": status.get("endpoint") or "-",
        "age": age(job["metadata"].get("creationTimestamp"), now),
    }


def knowledge_kept(retention: Optional[dict]) -> Optional[str]:
    """status.retention (spec.retention's probe figures) in words; None without one (pure)."""
    if not retention:
        return None
    if not retention.get("baseRight"):
        return f"the base model answered none of the {retention.get('probes', 0)} probes right"
    line = f"{retention['kept']} of {retention['baseRight']} probes the base model answered right are still right ({100 * retention['keptRatio']:.0f}%)"
    return line + (f"; lost: {'; '.join(retention['lost'])}" if retention.get("lost") else "")


def cluster_command(args) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        custom, core, namespace = _clients(args)
        if args.command == "list":
            return _list(Console(), custom, namespace, args.all_namespaces)
        if args.command == "status":
            return _status(Console(), custom, namespace, args.name)
        return _logs(core, namespace, args)
    except ApiException as err:
        reason = "not found" if err.status == 404 else (err.reason or f"HTTP {err.status}")
        print(f"kubetune {args.command}: {reason}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - no kubeconfig, unreachable API server
        print(f"kubetune {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def _list(console: Console, custom, namespace: str, all_namespaces: bool) -> int:
    if all_namespaces:
        items = custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)["items"]
    else:
        items = custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL)["items"]
    if not items:
        console.print(f"no FineTuneJobs {'in any namespace' if all_namespaces else f'in namespace {namespace}'}")
        return 0
    rows = [job_row(item) for item in sorted(items, key=lambda i: (i["metadata"].get("namespace", ""), i["metadata"]["name"]))]
    columns = list(rows[0]) if all_namespaces else [c for c in rows[0] if c != "namespace"]
    table = Table()
    for column in columns:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    console.print(table)
    return 0


def _status(console: Console, custom, namespace: str, name: str) -> int:
    job = custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
    row = job_row(job)
    status = job.get("status") or {}
    table = Table(title=f"FineTuneJob {namespace}/{name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("phase", "method", "progress", "loss", "restarts", "endpoint", "age"):
        table.add_row(key, row[key])
    eta = (status.get("progress") or {}).get("etaSeconds")
    outputs = status.get("outputs") or {}
    for key, value in (
        ("eta", f"{int(eta)} s" if isinstance(eta, (int, float)) else None),
        ("last checkpoint", status.get("lastCheckpoint")),
        ("knowledge kept", knowledge_kept(status.get("retention"))),
        ("adapter", outputs.get("adapterUri")),
        ("merged model", outputs.get("mergedUri")),
        ("started", status.get("startTime")),
        ("completed", status.get("completionTime")),
    ):
        if value:
            table.add_row(key, str(value))
    console.print(table)
    conditions = status.get("conditions") or []
    if conditions:
        ctable = Table(title="conditions")
        for column in ("type", "status", "reason", "message", "last transition"):
            ctable.add_column(column)
        for c in conditions:
            ctable.add_row(c.get("type", ""), c.get("status", ""), c.get("reason", ""), c.get("message", ""), c.get("lastTransitionTime", ""))
        console.print(ctable)
    return 0


def pod_name(name: str, args) -> str:
    if getattr(args, "merge", False):
        return merge_pod_name(name)
    return worker_pod_name(name, args.worker)


def _logs(core, namespace: str, args) -> int:
    if args.serve:
        pods = core.list_namespaced_pod(namespace, label_selector=selector_text(args.name, SERVE_ROLE)).items
        if not pods:
            print(f"kubetune logs: no serving pod of {args.name} in {namespace}", file=sys.stderr)
            return 1
        pod = pods[0].metadata.name
    else:
        pod = pod_name(args.name, args)
    kwargs = {"tail_lines": args.tail} if args.tail else {}
    if args.follow:
        stream = core.read_namespaced_pod_log(pod, namespace, follow=True, _preload_content=False, **kwargs)
        for chunk in stream.stream():
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        return 0
    # Raw bytes: the client would otherwise guess the body's type from its content-type.
    response = core.read_namespaced_pod_log(pod, namespace, _preload_content=False, **kwargs)
    sys.stdout.write(response.data.decode(errors="replace"))
    return 0

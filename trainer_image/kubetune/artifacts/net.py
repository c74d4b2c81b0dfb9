"""Helpers for the local servers KubeTune starts (embedded S3, kubetune-serve under
`kubetune run`): free loopback ports, and stopping a server's process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port now (it can be bound)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def stop_process_group(proc: "subprocess.Popen | None", grace: float) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True), SIGKILL
    it if it has not exited after `grace` seconds; nothing when it already exited."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

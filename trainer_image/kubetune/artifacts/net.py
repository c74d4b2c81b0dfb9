"""Helpers for the local servers KubeTune starts (embedded S3, kubetune-serve under
`kubetune run`): free loopback ports, stopping a server's process group, and children that
stop when the process that started them dies."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Callable, Optional

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def die_with_parent() -> Optional[Callable[[], None]]:
    """A `preexec_fn` for Popen: on Linux the child gets SIGTERM when this process dies, even
    by SIGKILL (prctl PR_SET_PDEATHSIG), so a killed `kubetune run` leaves no trainer, server
    or S3 behind (they run in their own sessions, which a terminal's signals do not reach).
    None elsewhere, and off the main thread: the kernel sends the signal when the *thread*
    that started the child ends."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: nothing would signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec

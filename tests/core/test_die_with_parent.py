"""A child started with `die_with_parent()` stops when the process that started it is
SIGKILLed (a killed `kubetune run` leaves no trainer, server or S3 running); without it the
child, in its own session, would run on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from kubetune.artifacts.net import die_with_parent
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                             preexec_fn=die_with_parent() if sys.argv[1] == "guarded" else None)
    print(child.pid, flush=True)
    time.sleep(300)
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def child_after_parent_killed(mode: str, wait: float) -> tuple[int, bool]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + wait
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    return child, alive(child)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_guarded_child_stops_when_its_parent_is_killed():
    _, still_running = child_after_parent_killed("guarded", wait=20)
    assert not still_running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_an_unguarded_child_outlives_its_killed_parent():
    child, still_running = child_after_parent_killed("unguarded", wait=2)
    try:
        assert still_running  # what the guard prevents
    finally:
        os.kill(child, signal.SIGKILL)


def test_no_guard_off_the_main_thread():
    """PR_SET_PDEATHSIG fires when the starting *thread* ends: a server started from a worker
    thread would die with that thread, so none is set there."""
    import threading

    from kubetune.artifacts.net import die_with_parent

    seen = []
    thread = threading.Thread(target=lambda: seen.append(die_with_parent()))
    thread.start()
    thread.join()
    assert seen == [None] and callable(die_with_parent())

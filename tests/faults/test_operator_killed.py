"""The operator process (`python -m kubetune_operator`, as its image runs it, logged in as the
chart's ServiceAccount on the local control plane) is SIGKILLed in every phase of a job's
life and a new one takes over: while it creates the children, while training runs, while
merging, and while the serving Deployment comes up. Each child is created exactly once,
nothing is restarted that was fine, and the status ends as an uninterrupted run's (Serving,
no restarts, outputs and endpoint set).

The graceful restart while Running is in tests/operator; this is a hard kill at each phase,
by a real signal, of a real process.
"""

from __future__ import annotations

import pytest

from operator_harness import EXAMPLE, wait_for

JOB = "qa-bot"
WORKERS = (f"{JOB}-worker-0", f"{JOB}-worker-1")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_operator_killed_in_every_phase_finishes_the_job_once(operator, ns, kubectl, audit):
    expected = {("configmaps", f"{JOB}-config"), ("services", f"{JOB}-workers"), ("pods", WORKERS[0]), ("pods", WORKERS[1]),
                ("pods", f"{JOB}-merge"), ("deployments", f"{JOB}-serve"), ("services", f"{JOB}-serve")}  # fmt: skip
    first_seen: dict = {}
    kills = 0

    def uids() -> dict:
        """The uid of each existing child: a child deleted and created again gets a new one."""
        return {(plural, name): obj["metadata"]["uid"] for plural, name in expected if (obj := ns.get(plural, name)) is not None}

    def remember() -> None:
        for key, uid in uids().items():
            first_seen.setdefault(key, uid)

    def kill_and_restart() -> None:
        nonlocal kills
        operator.kill()
        kills += 1
        operator.start()

    ns.create_secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"})
    kubectl.apply(EXAMPLE)

    # 1. creating children: killed as soon as the first one exists
    wait_for(lambda: ns.get("configmaps", f"{JOB}-config"), what="first child created", interval=0.02)
    kill_and_restart()
    wait_for(lambda: set(WORKERS) <= set(ns.workers(JOB)) and ns.get("services", f"{JOB}-workers"), what="all children")
    remember()

    # 2. running
    for name in WORKERS:
        ns.set_pod_status(name, "Running")
    wait_for(lambda: ns.status(JOB).get("phase") == "Running", what="Running")
    kill_and_restart()
    # The new operator must adopt the running gang, not replace it.
    wait_for(lambda: ns.status(JOB).get("observedGeneration") == 1 and ns.status(JOB).get("phase") == "Running", what="Running after restart")

    # 3. merging
    for name in WORKERS:
        ns.set_pod_status(name, "Succeeded", exit_code=0)
    wait_for(lambda: ns.get("pods", f"{JOB}-merge"), what="merge pod")
    remember()
    kill_and_restart()
    wait_for(lambda: ns.status(JOB).get("phase") == "Merging", what="Merging after restart")
    ns.set_pod_status(f"{JOB}-merge", "Succeeded", exit_code=0)

    # 4. serving
    wait_for(lambda: ns.get("deployments", f"{JOB}-serve"), what="serving Deployment")
    remember()
    kill_and_restart()
    ns.make_ready(f"{JOB}-serve")
    final = wait_for(lambda: ns.status(JOB).get("phase") == "Serving" and ns.status(JOB).get("endpoint") and ns.status(JOB), what="Serving")

    # Every child was created once: each still has the uid it had when first seen (a
    # restarted operator that replaced one would have given it a new uid), and the operator
    # asked to create nothing else. A new operator may ask to create a child that already
    # exists (it creates a new job's children without reading first); the API server
    # refuses that with 409 (the audit log records both).
    remember()
    assert uids() == first_seen and set(first_seen) == expected, (uids(), first_seen)
    asked = {(e["objectRef"]["resource"], e["objectRef"].get("name")) for e in audit.events(operator.user)
             if e["verb"] == "create" and e["objectRef"].get("namespace") == ns.name and e["objectRef"]["resource"] != "events"}  # fmt: skip
    assert asked == expected, asked
    assert final["restarts"] == 0 and final["endpoint"] == f"http://{JOB}-serve.{ns.name}.svc:8000/v1"
    assert final["outputs"] == {"adapterUri": "s3://models/qa-bot/adapter", "mergedUri": "s3://models/qa-bot/model"}
    assert kills == 4

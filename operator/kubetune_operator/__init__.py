"""KubeTune operator: reconciles FineTuneJob resources (kopf).

A map, in the order a job flows through it:

    __main__.py   `python -m kubetune_operator`: settings from the environment, then kopf.run
    settings.py   the operator's own settings (images, interval, ports), set by the Helm chart
    handlers.py   kopf wiring only: startup, login, a timer and a spec-change handler per job
                  that both run reconcile.reconcile, delete -> reconcile.cleanup
    state.py      OperatorState, kopf's memo: the API client, metrics, shared caches
                  (Secrets, S3 clients, kopf's diff base) and one JobRecord per job
    reconcile.py  one run of one job: observe -> decide -> act -> report, one at a time per
                  job, decided again when the job moved on; cleanup on deletion
    observe.py    what a run sees: the job, its checks and Secrets, its children, the
                  trainer's progress.json, the memory plan -> Observation (Observed inside)
    status.py     the pure state machine: decide(job, Observed, progress, previous status)
                  -> Decision(typed FineTuneJobStatus, actions, events); table-tested
    memory.py     pure: the memory planner's verdict for the MemoryFits condition
    act.py        runs a Decision's actions: creates/deletes children, idempotently
    builders.py   pure: a job -> its child manifests (ConfigMap, Service, Pods, Deployment)
    report.py     the status patch (to the version decided on), Events, 403 refusals
    metrics.py    OperatorMetrics: run counters, job series computed from the state at scrape
    kube.py       the operator's API calls (lightkube) and kopf's login, one configuration

Shared with the trainer and the CLI (trainer_image/kubetune): the contracts in `kubetune.api`
(`spec` the resource, `crd` the CRD and typed status, `naming` child names and labels,
`layout` where a job's files go, `validation` semantic checks, `progress` what the trainer
reports), `kubetune.planner` (the memory estimate) and `kubetune.artifacts.storage` (S3
access, `S3Clients` for per-job keys). Nothing from the trainer, the server or the CLI
(tests/core/test_structure.py checks the import closure).
"""

"""The contracts: what a FineTuneJob says and what every part agrees on. The operator
imports only this layer and the planner (tests/core/test_structure.py checks it), so
nothing here imports torch, the trainer, the server or the CLI.

    spec.py        the FineTuneJob spec (pydantic; the one source of the CRD's schema)
    crd.py         the CRD YAML and the typed status (`python -m kubetune.api.crd`)
    validation.py  checks beyond the schema, the same messages in `kubetune validate` and the operator
    uri.py         s3:// file:// pvc:// locations
    layout.py      where a job's outputs, checkpoints and metrics go (JobLayout)
    naming.py      names of a job's children (pods, services, deployment)
    progress.py    progress.json: what the trainer tells the operator while it runs
    exitcodes.py   the trainer's exit codes (64 bad input, 74 storage, 75 preempted)
"""

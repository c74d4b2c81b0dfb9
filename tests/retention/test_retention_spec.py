"""spec.retention in the job document: off unless set, defaults when empty, refused on plain text."""

from __future__ import annotations

import pytest

from kubetune.api.spec import SpecError, load_job

JOB = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: facts}}
spec:
  model: {{uri: s3://models/base}}
  dataset:
    uri: s3://data/facts.jsonl
    format: {format}
{retention}"""


def write(tmp_path, retention: str, format: str = "prompt_response"):
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(format=format, retention=retention))
    return path


def test_off_unless_set_and_defaults_when_empty(tmp_path):
    assert load_job(write(tmp_path, "")).spec.retention is None
    retention = load_job(write(tmp_path, "  retention: {}\n")).spec.retention
    assert (retention.replay.ratio, retention.replay.uri, retention.replay.max_new_tokens) == (0.5, None, 96)
    assert (retention.probes.uri, retention.probes.max_new_tokens, retention.probes.warn_below, retention.batch_size) == (None, 32, 0.9, 16)


def test_a_text_job_is_refused_at_the_retention_line(tmp_path):
    path = write(tmp_path, "  # keep what it knew\n  retention:\n    replay: {ratio: 1.0}\n", format="text")
    with pytest.raises(SpecError) as err:
        load_job(path)
    assert str(err.value) == (
        f"{path}:10: spec.retention: replays and probes chat answers, but dataset.format text trains plain text without a chat "
        "template; use a chat format (prompt_response, alpaca, conversation, sharegpt, openai) or remove spec.retention"
    )


def test_its_files_are_job_locations(tmp_path):
    job = load_job(write(tmp_path, "  retention: {replay: {uri: s3://data/prompts.jsonl}, probes: {uri: pvc://vol/probes.jsonl}}\n"))
    assert ("spec.retention.replay.uri", "s3://data/prompts.jsonl") in job.spec.locations()
    assert ("spec.retention.probes.uri", "pvc://vol/probes.jsonl") in job.spec.locations()

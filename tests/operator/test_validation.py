"""Semantic checks shared by `kubetune validate` and the operator's InvalidSpec condition."""

from __future__ import annotations

import pytest
from operator_helpers import LOCAL_EXAMPLES, cluster_examples, example

from kubetune.api.validation import check_job


def with_spec(name: str, **changes):
    job = example(name)
    doc = job.model_dump(by_alias=True, exclude_none=True)
    for path, value in changes.items():
        node = doc
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return type(job).model_validate(doc)


@pytest.mark.parametrize("name", cluster_examples())
def test_examples_have_no_problems_on_a_cluster(name):
    assert check_job(example(name), on_cluster=True) == []


@pytest.mark.parametrize("name", LOCAL_EXAMPLES)
def test_local_examples_have_no_problems_locally_but_cannot_run_on_a_cluster(name):
    job = example(name)
    assert check_job(job, on_cluster=False) == []
    assert any("pods cannot see" in p.message for p in check_job(job, on_cluster=True))


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"spec__resources__limits": {"nvidia.com/gpu": 2}}, "spec.resources.limits.nvidia.com/gpu", "gpusPerNode is 4"),
        ({"spec__distributed__deepspeedConfig": {"train_batch_size": 16}}, "spec.distributed.deepspeedConfig.train_batch_size", "32"),
        ({"spec__distributed__deepspeedConfig": {"zero_optimization": {"stage": 3}}}, "spec.distributed.deepspeedConfig.zero_optimization.stage", "contradicts"),
        ({"spec__dataset__uri": "data/qa.jsonl"}, "spec.dataset.uri", "pods cannot see"),
        ({"spec__output__uri": "s3://models/../x"}, "spec.output.uri", "climb"),
        ({"spec__method__lora__targetModules": ["all-linear", "q_proj"]}, "spec.method.lora.targetModules", "all-linear"),
        ({"spec__training__eval": {"everySteps": 10}, "spec__dataset__validation": None}, "spec.training.eval.everySteps", "validation"),
        ({"spec__output__merge": False, "spec__serving__engine": "vllm"}, "spec.output.merge", "vllm"),
        ({"metadata__name": "9-lives"}, "metadata.name", "letter"),
        ({"metadata__name": "a" * 60}, "metadata.name", "too long"),
    ],
)
def test_problems_name_the_field_and_say_what_is_expected(changes, field, words):
    problems = check_job(with_spec("lora-multinode.yaml", **changes), on_cluster=True)
    assert [p.field for p in problems] == [field]
    assert words in problems[0].message


def test_local_runs_accept_paths_and_need_no_output_uri():
    job = with_spec("lora-multinode.yaml", spec__dataset__uri="data/qa.jsonl", spec__output={"merge": True})
    assert check_job(job, on_cluster=False) == []
    assert [p.field for p in check_job(job, on_cluster=True)] == ["spec.dataset.uri", "spec.output.uri"]

"""Property-based fuzzing (hypothesis) of everything that reads user input before a model loads:
the spec parser, job files, locations, the dataset reader and the format converters.

The properties: hostile input only ever raises the component's own error type (which the
CLI, trainer and operator turn into a message), and what is accepted is well-formed.
"""

from __future__ import annotations

import copy
import json
import os
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_spec_catalogue import BASE

from kubetune.api import crd
from kubetune.api.spec import ColumnMapping, FineTuneJob, SpecError, dump_job, load_job, parse_job
from kubetune.api.uri import Uri, UriError, parse_uri
from kubetune.api.validation import check_job
from kubetune.data.converters import DEFAULT_COLUMNS, RecordError, resolve_columns, to_messages
from kubetune.data.loader import DataError, read_records

# CI runs a quick pass; KUBETUNE_FUZZ_EXAMPLES=5000 for a deep one.
FUZZ = settings(max_examples=int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)


def _schema_paths(node: dict, path: tuple = ()) -> list[tuple]:
    """Every field path of the CRD's spec schema: mutation targets that reach deep validators."""
    paths = [path] if path else []
    for name, child in node.get("properties", {}).items():
        paths += _schema_paths(child, path + (name,))
    return paths


SPEC_PATHS = _schema_paths(crd.open_api_schema()["properties"]["spec"])


def _set(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc["spec"]
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return doc


def _check_parsed(doc) -> None:
    try:
        job = parse_job(doc)
    except SpecError as err:
        assert err.problems and all(isinstance(m, str) and m for _, _, m in err.problems)
        return
    assert isinstance(job, FineTuneJob)
    # What was accepted round-trips through the user-facing form, and semantic checks never crash.
    assert parse_job(dump_job(job)) == job
    for on_cluster in (False, True):
        assert all(p.field and p.message for p in check_job(job, on_cluster=on_cluster))


@FUZZ
@given(json_values)
def test_parse_job_random_documents(doc):
    _check_parsed(doc)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SPEC_PATHS), json_values), min_size=1, max_size=4))
def test_parse_job_mutated_valid_documents(mutations):
    doc = BASE
    for path, value in mutations:
        doc = _set(doc, path, value)
    _check_parsed(doc)


yaml_text = st.text(alphabet=string.printable + "ü你\u2028\ufeff", max_size=300)


@FUZZ
@given(st.one_of(yaml_text, json_values.map(lambda v: yaml.safe_dump({"metadata": {"name": "a"}, "spec": v}))))
def test_load_job_random_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "job.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_job(path)
    except SpecError as err:
        assert str(err).startswith(str(path))


location_text = st.text(max_size=40) | st.builds(
    lambda scheme, rest: f"{scheme}://{rest}", st.sampled_from(["s3", "pvc", "hf", "file", "S3", "gs", ""]), st.text(alphabet="ab./\\%:\x00 ", max_size=20)
)


@FUZZ
@given(location_text)
def test_parse_uri(value):
    try:
        uri = parse_uri(value, "/base")
    except UriError as err:
        assert str(err)
        return
    assert isinstance(uri, Uri) and uri.scheme in ("s3", "file", "pvc", "hf")
    if uri.scheme == "file":
        assert Path(uri.path).is_absolute()
        return
    # Remote keys never climb out of their bucket/volume and re-parse to the same location.
    assert ".." not in uri.path.split("/") and not uri.path.startswith("/")
    assert parse_uri(str(uri)) == uri


@pytest.mark.parametrize("value", ["~0", "file://~nosuchuser/x.jsonl"])
def test_home_of_unknown_user_is_a_uri_error(value):
    with pytest.raises(UriError):
        parse_uri(value)


formats = st.sampled_from(sorted(DEFAULT_COLUMNS))
roles = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", "", None, 1])
turns = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": roles, "from": roles, "content": scalars, "value": scalars,
            "input": scalars, "output": scalars, "system": scalars,
        },
    ) | json_values,
    max_size=5,
)  # fmt: skip
records = json_values | st.fixed_dictionaries(
    {},
    optional={
        "prompt": scalars, "response": scalars, "instruction": scalars, "input": scalars, "output": scalars,
        "history": st.lists(st.lists(scalars, max_size=3), max_size=3) | scalars, "system": scalars,
        "conversation": turns, "conversations": turns, "messages": turns, "text": scalars, "content": scalars,
    },
)  # fmt: skip


@FUZZ
@given(formats, records)
def test_converters(fmt, record):
    try:
        messages = to_messages(record, fmt, resolve_columns(fmt, ColumnMapping()))
    except RecordError as err:
        assert err.field and err.message
        return
    assert messages and all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
    assert all(m["role"] in ("system", "user", "assistant") for m in messages)
    assert messages[-1]["role"] == "assistant"
    assert all(m["role"] != "system" for m in messages[1:])
    if fmt != "text":
        body = messages[1:] if messages[0]["role"] == "system" else messages
        assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)


@FUZZ
@given(st.binary(max_size=300) | st.lists(json_values, max_size=4).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode()))
def test_read_records(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(data)
    try:
        records = read_records(path, "data.jsonl")
    except DataError as err:
        assert str(err).startswith("data.jsonl")
        return
    assert all(isinstance(where, str) and where.startswith("data.jsonl") for where, _ in records)

"""Locations and the object store, over local folders and a real SeaweedFS S3 server."""

from __future__ import annotations

import pytest

from kubetune.api.layout import LayoutError, job_layout
from kubetune.api.progress import Progress, parse_progress
from kubetune.api.spec import parse_job
from kubetune.api.uri import Uri, UriError, parse_uri
from kubetune.artifacts.storage import LocalStore, PreconditionFailed, S3Store, StorageError, fetch, open_store


def test_parse_uri(tmp_path):
    assert parse_uri("s3://bucket/a/b/") == Uri("s3", "bucket", "a/b")
    assert parse_uri("pvc://claim/models/x") == Uri("pvc", "claim", "models/x")
    assert parse_uri("data/x.jsonl", tmp_path) == Uri("file", "", str(tmp_path / "data" / "x.jsonl"))
    assert parse_uri("file://data/x.jsonl", tmp_path).path == str(tmp_path / "data" / "x.jsonl")
    assert str(parse_uri("s3://b/p").join("adapter", "x.json")) == "s3://b/p/adapter/x.json"


@pytest.mark.parametrize(
    "value, message",
    [
        ("ftp://host/x", "unsupported scheme 'ftp' in 'ftp://host/x'; expected one of s3://, file://, pvc://, hf:// or a path"),
        ("s3://", "'s3://' has no bucket name"),
        ("s3://bucket/../other/x", "'s3://bucket/../other/x' contains '..'; locations may not climb out of their bucket"),
        ("pvc://claim/a/../../etc/passwd", "'pvc://claim/a/../../etc/passwd' contains '..'; locations may not climb out of their volume"),
        ("hf://org", "'hf://org' must be hf://ORG/NAME"),
        ("  ", "empty location"),
    ],
)
def test_bad_uris(value, message):
    with pytest.raises(UriError) as info:
        parse_uri(value)
    assert str(info.value) == message


def test_join_refuses_traversal():
    with pytest.raises(UriError):
        parse_uri("s3://b/p").join("../x")


def _exercise(store):
    store.put_bytes("a/one.txt", b"1")
    store.put_bytes("a/two.txt", b"22")
    store.put_bytes("b.txt", b"333")
    assert [(o.key, o.size) for o in store.list()] == [("a/one.txt", 1), ("a/two.txt", 2), ("b.txt", 3)]
    assert [o.key for o in store.list("a/")] == ["a/one.txt", "a/two.txt"]
    assert store.get_bytes("a/two.txt") == b"22"
    assert store.exists("b.txt") and not store.exists("c.txt")
    with pytest.raises(PreconditionFailed):
        store.put_bytes("b.txt", b"x", if_absent=True)
    store.put_bytes("c.txt", b"new", if_absent=True)
    assert store.get_bytes("c.txt") == b"new"
    with pytest.raises(FileNotFoundError):
        store.get_bytes("missing.txt")
    store.delete(["a/one.txt", "c.txt"])
    assert [o.key for o in store.list()] == ["a/two.txt", "b.txt"]
    with pytest.raises(UriError):
        store.get_bytes("../escape")


def test_local_store(tmp_path):
    _exercise(open_store(str(tmp_path / "root")))


def test_s3_store(s3_env):
    store = open_store("s3://checkpoints/store-test")
    assert isinstance(store, S3Store)
    _exercise(store)


def test_dirs_round_trip_and_fetch(tmp_path, s3_env):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"\x00" * 1000)
    store = open_store("s3://models/dir-test")
    assert store.put_dir(src, "model") == ["model/config.json", "model/sub/weights.bin"]
    local = fetch("s3://models/dir-test/model", tmp_path / "dl")
    assert (local / "sub" / "weights.bin").read_bytes() == b"\x00" * 1000
    one = fetch("s3://models/dir-test/model/config.json", tmp_path / "dl2")
    assert one.read_text() == "{}"
    with pytest.raises(FileNotFoundError):
        fetch("s3://models/dir-test/nothing-here", tmp_path / "dl3")
    assert fetch(str(src), tmp_path / "unused") == src


def test_wrong_credentials_are_a_clear_error(seaweed, monkeypatch):
    for key, value in seaweed.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    monkeypatch.setenv("KUBETUNE_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError) as info:
        open_store("s3://checkpoints/x").get_bytes("k")
    assert "denied" in str(info.value) and "check the credentials Secret" in str(info.value)
    assert "wrong-secret" not in str(info.value)


def test_layout_local_and_cluster(tmp_path):
    doc = {"metadata": {"name": "qa"}, "spec": {"model": {"uri": "m"}, "dataset": {"uri": "d.jsonl"}}}
    local = job_layout(parse_job(doc), tmp_path)
    assert local.adapter.path == str(tmp_path / "runs" / "qa" / "output" / "adapter")
    assert local.serving_model == local.model
    assert local.progress.path.endswith("output/checkpoints/progress.json")
    with pytest.raises(LayoutError, match="spec.output.uri is required"):
        job_layout(parse_job(doc))
    doc["spec"].update(output={"uri": "s3://models/qa"}, checkpoint={"uri": "s3://ckpt/qa"}, method={"type": "prompt"})
    cluster = job_layout(parse_job(doc))
    assert str(cluster.progress) == "s3://ckpt/qa/progress.json"
    assert cluster.model is None and str(cluster.serving_model) == "s3://models/qa/adapter"
    doc["spec"]["method"] = {"type": "full"}
    full = job_layout(parse_job(doc))
    assert full.adapter is None and str(full.model) == "s3://models/qa/model"


@pytest.mark.parametrize("method, merge, needs_merge", [
    ("lora", True, True), ("qlora", True, True), ("lora", False, False),
    ("ptuning", True, False), ("prompt", True, False), ("full", True, False), ("freeze", True, False),
])
def test_layout_says_whether_the_job_merges(method, merge, needs_merge):
    doc = {"metadata": {"name": "qa"}, "spec": {"model": {"uri": "s3://m/x"}, "dataset": {"uri": "s3://d/x.jsonl"},
                                                "method": {"type": method, **({"freeze": {"lastLayers": 2}} if method == "freeze" else {})},
                                                "output": {"uri": "s3://models/qa", "merge": merge}}}  # fmt: skip
    layout = job_layout(parse_job(doc))
    assert layout.needs_merge is needs_merge


def test_progress_round_trip():
    progress = Progress(phase="training", step=30, total_steps=120, loss=1.25)
    parsed = parse_progress(progress.to_json())
    assert parsed.step == 30 and parsed.percent == 25.0 and parsed.updated_at
    assert parse_progress(b'{"phase": "done", "future_field": 1}').phase == "done"
    with pytest.raises(ValueError, match="unknown phase"):
        parse_progress(b'{"phase": "exploding"}')

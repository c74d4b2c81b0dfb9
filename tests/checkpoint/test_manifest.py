"""The checkpoint manifest, rotation plan and work split: pure functions."""

from __future__ import annotations

import json

import pytest

from kubetune.artifacts.checkpoint.manager import assign_files
from kubetune.artifacts.checkpoint.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    checkpoint_name,
    checkpoint_step,
    missing_or_wrong,
    parse_manifest,
    plan_rotation,
)


def manifest(name="step-000000010", **kw) -> Manifest:
    files = [FileEntry("mp_rank_00_model_states.pt", 100, "a" * 64), FileEntry("rng/rank-00000.pt", 7, "b" * 64)]
    return Manifest(name=name, step=checkpoint_step(name), world_size=2, zero_stage=2, files=files, client_state={"epoch": 1.5}, tag=name, **kw)


def test_names_round_trip_and_sort_by_step():
    assert checkpoint_name(100) == "step-000000100"
    assert checkpoint_step("step-000000100") == 100
    assert checkpoint_step("progress.json") is None
    assert checkpoint_step("step-12") is None
    with pytest.raises(ValueError):
        checkpoint_name(-1)


def test_manifest_json_round_trip():
    m = manifest()
    parsed = parse_manifest(m.to_json(), m.name)
    assert parsed == Manifest(**{**m.__dict__, "files": sorted(m.files, key=lambda f: f.path)})
    assert parsed.total_bytes == 107


def test_client_state_must_be_json():
    m = manifest()
    m.client_state = {"sampler": object()}
    with pytest.raises(TypeError, match="client_state must be plain JSON"):
        m.to_json()


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"format": 99}).encode(), "format 99"),
        (json.dumps({"format": 1, "name": "step-000000010"}).encode(), "missing or has a malformed field"),
    ],
)
def test_bad_manifests_say_what_is_wrong(raw, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest(raw, "step-000000010")


def test_manifest_in_the_wrong_folder_and_empty_manifest_are_refused():
    with pytest.raises(ManifestError, match="lies in 'step-000000020'"):
        parse_manifest(manifest().to_json(), "step-000000020")
    empty = manifest()
    empty.files = []
    with pytest.raises(ManifestError, match="lists no files"):
        parse_manifest(empty.to_json(), empty.name)


def test_listing_checked_against_manifest():
    m = manifest()
    ok = {"mp_rank_00_model_states.pt": 100, "rng/rank-00000.pt": 7, "manifest.json": 300}
    assert missing_or_wrong(m.files, ok) is None
    assert "missing from storage" in missing_or_wrong(m.files, {"mp_rank_00_model_states.pt": 100})
    assert "has 99 bytes in storage, manifest.json says 100" in missing_or_wrong(m.files, {**ok, "mp_rank_00_model_states.pt": 99})


def test_rotation_keeps_newest_complete_and_drops_older_leftovers():
    states = {
        "step-000000010": True,
        "step-000000020": True,
        "step-000000025": False,  # killed upload, older than the newest complete one
        "step-000000030": True,
        "step-000000040": False,  # newer than every complete one: left alone
    }
    assert plan_rotation(states, keep=2) == ["step-000000010", "step-000000025"]
    assert plan_rotation(states, keep=5) == ["step-000000025"]
    assert plan_rotation({"step-000000005": False}, keep=1) == []
    with pytest.raises(ValueError):
        plan_rotation(states, keep=0)


def test_files_split_evenly_by_bytes():
    files = {"a": 100, "b": 90, "c": 10, "d": 5, "e": 1}
    split = assign_files(files, [4, 5])
    assert sorted(p for paths in split.values() for p in paths) == sorted(files)
    assert split == {4: ["a", "d"], 5: ["b", "c", "e"]}  # 105 and 101 bytes
    assert assign_files(files, [3]) == {3: ["a", "b", "c", "d", "e"]}


def test_rank_files_are_told_from_shared_ones():
    from kubetune.artifacts.checkpoint.manifest import file_rank

    assert file_rank("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3  # ZeRO 1-3 optimizer partition
    assert file_rank("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert file_rank("zero_pp_rank_1_mp_rank_00_model_states.pt") == 1  # ZeRO-3 parameter partition
    assert file_rank("rng/rank-00002.pt") == 2
    assert file_rank("mp_rank_00_model_states.pt") is None  # ZeRO 0-2: every rank reads it
    assert file_rank("other/rng/rank-00002.pt") is None and file_rank("zero_to_fp32.py") is None

"""spec.retention's prompt sets: the shipped ones, a user's files (a bad line refused with
file:line), and which prompts a job replays."""

from __future__ import annotations

import json
import re

import pytest

from kubetune.api.spec import RetentionSpec
from kubetune.data.loader import DataError
from kubetune.retention.sets import (
    Probe,
    choose_replay,
    load_probes,
    load_replay_prompts,
    normalized,
    plan_sets,
    replay_candidates,
    replay_count,
)

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_shipped_sets_are_large_bilingual_and_disjoint(tmp_path):
    prompts = load_replay_prompts(None, tmp_path)
    probes = load_probes(None, tmp_path)
    chinese = [p for p in prompts if CJK.search(p)]
    assert len(prompts) >= 350 and len(chinese) >= 100 and len(prompts) - len(chinese) >= 250
    assert len({normalized(p) for p in prompts}) == len(prompts)  # no prompt twice
    assert len(probes) >= 80 and any(CJK.search(p.question) for p in probes)
    assert all(p.expect and all(e.strip() for e in p.expect) for p in probes)
    # Held out: no probe question is ever a replay prompt.
    assert not {normalized(p) for p in prompts} & {normalized(p.question) for p in probes}
    assert replay_candidates(prompts, probes) == prompts


def test_user_files_replace_the_shipped_sets(tmp_path):
    (tmp_path / "mine.jsonl").write_text('{"prompt": "Name a colour."}\n\n{"prompt": "说一个数字。"}\n')
    (tmp_path / "probes.jsonl").write_text('{"question": "Capital of Peru?", "expect": ["Lima"]}\n')
    assert load_replay_prompts("mine.jsonl", tmp_path / "cache", base_dir=tmp_path) == ["Name a colour.", "说一个数字。"]
    assert load_probes("probes.jsonl", tmp_path / "cache", base_dir=tmp_path) == [Probe("Capital of Peru?", ("Lima",))]


@pytest.mark.parametrize(
    "lines, loader, message",
    [
        (['{"prompt": "ok"}', '{"prompt": ""}'], load_replay_prompts, "{path}:2: prompt: expected a non-empty string, got ''"),
        (['{"prompt": "ok"}', '{"question": "no prompt"}'], load_replay_prompts, "{path}:2: prompt: expected a non-empty string, got None"),
        (['{"prompt": "ok"}', '["a list"]'], load_replay_prompts, "{path}:2: expected a JSON object, got list"),
        (['{"prompt": "ok"}', '{"prompt": "half'], load_replay_prompts, "{path}:2: invalid JSON: Unterminated string starting at (column 12)"),
        (['{"question": "Q?", "expect": ["a"]}', '{"question": "Q?"}'], load_probes,
         "{path}:2: expect: expected a non-empty list of non-empty strings (phrases a right answer contains), got None"),
        (['{"question": "Q?", "expect": [""]}'], load_probes,
         "{path}:1: expect: expected a non-empty list of non-empty strings (phrases a right answer contains), got ['']"),
    ],
)  # fmt: skip
def test_a_bad_line_is_refused_with_file_and_line(tmp_path, lines, loader, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        loader(str(path), tmp_path / "cache")
    assert message.format(path=path) in str(err.value)


def test_a_missing_file_names_the_field(tmp_path):
    with pytest.raises(DataError, match=r"^probe questions nope.jsonl: .*nope.jsonl does not exist$"):
        load_probes("nope.jsonl", tmp_path / "cache", base_dir=tmp_path)


def test_probe_questions_and_repeats_are_never_replayed():
    probes = [Probe("What is the capital of Peru?", ("Lima",))]
    prompts = ["what is the  capital of PERU?", "Name a colour.", "name a colour. ", "Count to three."]
    assert replay_candidates(prompts, probes) == ["Name a colour.", "Count to three."]


def test_replay_choice_is_fixed_by_the_seed_and_capped():
    candidates = [f"prompt {i}" for i in range(100)]
    assert choose_replay(candidates, 10, seed=1) == choose_replay(candidates, 10, seed=1)
    assert choose_replay(candidates, 10, seed=1) != choose_replay(candidates, 10, seed=2)
    assert replay_count(0.5, 30, 100) == 15 and replay_count(2.0, 80, 100) == 100 and replay_count(0.0, 30, 100) == 0


def test_plan_sets_reports_what_it_left_out(tmp_path):
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["A?", "B?", "a?", "C?"]))
    (tmp_path / "probes.jsonl").write_text(json.dumps({"question": "C?", "expect": ["c"]}) + "\n")
    spec = RetentionSpec.model_validate({"replay": {"ratio": 2.0, "uri": "mine.jsonl"}, "probes": {"uri": "probes.jsonl"}})
    sets = plan_sets(spec, train_samples=3, seed=7, cache_dir=tmp_path / "cache", base_dir=tmp_path)
    assert sorted(sets.replay) == ["A?", "B?"] and sets.wanted == 6 and sets.excluded == 2

"""The probe figures (kept of what the base answered right), and the pure parts of replay:
batching across ranks, cutting answers, replay samples within the length limits."""

from __future__ import annotations

import pytest

from kubetune.data.tokenize import IGNORE, LengthLimits
from kubetune.retention import describe, is_correct, retention_report
from kubetune.retention.generate import batch_plan, cut_answer
from kubetune.retention.phase import cache_key, folder_fingerprint, replay_sample
from kubetune.retention.sets import Probe

PROBES = [
    Probe("What is the capital of France?", ("Paris",)),
    Probe("How many legs does a spider have?", ("eight", "8")),
    Probe("中国的首都是哪里？", ("北京",)),
    Probe("What is 5 times 6?", ("30", "thirty")),
]


def test_kept_counts_only_what_the_base_answered_right():
    base = ["The capital of France is Paris.", "A spider has eight legs.", "中国的首都是北京。", "5 times 6 is 11."]
    tuned = ["Paris is the capital of France.", "The Lantern Tide festival.", "北京。", "Thirty."]
    report = retention_report(PROBES, base, tuned, warn_below=0.9)
    assert (report["probes"], report["base_right"], report["kept"], report["kept_ratio"]) == (4, 3, 2, 0.6667)
    assert report["below_threshold"] is True
    assert [e["question"] for e in report["lost"]] == ["How many legs does a spider have?"]
    assert report["lost"][0] == {"question": PROBES[1].question, "expect": ["eight", "8"], "base": base[1], "tuned": tuned[1]}
    assert [e["question"] for e in report["gained"]] == ["What is 5 times 6?"]
    assert report["unchanged"] == 0 and 0 < report["similarity"] < 1
    assert describe(report) == "2 of 3 probes the base model answered right are still right (67%; 1 lost, 1 gained)"


def test_identical_answers_keep_everything():
    answers = ["Paris.", "Eight.", "北京", "I am not sure."]
    report = retention_report(PROBES, answers, answers, warn_below=0.9)
    assert (report["kept"], report["base_right"], report["kept_ratio"], report["below_threshold"]) == (3, 3, 1.0, False)
    assert report["unchanged"] == 4 and report["similarity"] == 1.0 and report["lost"] == report["gained"] == []


def test_nothing_to_keep_is_not_a_failure():
    report = retention_report(PROBES[:1], ["Rome."], ["Lyon."], warn_below=0.9)
    assert report["kept_ratio"] is None and report["below_threshold"] is False
    assert describe(report) == "the base model answered none of the 1 probes right: nothing to keep"


def test_a_right_answer_contains_a_reference_phrase_as_whole_words():
    assert is_correct("It is PARIS, of course", ["Paris"]) is True
    assert is_correct("Lyon", ["Paris"]) is False
    assert is_correct("anything", []) is None
    # Whole words: a digit inside a number, a name inside a longer word are not the phrase.
    assert is_correct("A bicycle has a circumference of 240 inches.", ["two", "2"]) is False
    assert is_correct("A bicycle has 2 wheels.", ["two", "2"]) is True
    assert is_correct("Romeo and Juliet", ["Rome"]) is False
    assert is_correct("It is 100°C (212°F).", ["100"]) is True
    assert is_correct("Carbon dioxide (CO2).", ["CO2"]) is True
    # No spaces in Chinese: a CJK phrase is found inside the sentence.
    assert is_correct("中国的首都是北京。", ["北京"]) is True
    assert is_correct("The answer is 北京", ["北京"]) is True


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_batches_do_not_depend_on_the_number_of_ranks(world):
    lengths = [7, 3, 9, 3, 12, 5, 8, 1, 4, 4, 6]
    (everyone, own), = batch_plan(lengths, batch_size=3, world=1)
    assert own == len(everyone)
    plan = batch_plan(lengths, batch_size=3, world=world)
    assert len(plan) == world and len({len(batches) for batches, _ in plan}) == 1  # equal calls on every rank
    for rank, (batches, own) in enumerate(plan):
        assert batches[:own] == everyone[rank::world]  # the same batches, dealt out
        assert all(filler == everyone[0] for filler in batches[own:])
    assert sorted(i for batch in everyone for i in batch) == list(range(len(lengths)))


def test_batches_hold_prompts_of_similar_length():
    assert batch_plan([5, 1, 9, 2], batch_size=2, world=1) == [([[1, 3], [0, 2]], 2)]


def test_an_answer_ends_at_its_first_stop_token():
    assert cut_answer([5, 6, 2, 2, 2], {2}) == ([5, 6, 2], True)
    assert cut_answer([5, 6, 7], {2, 9}) == ([5, 6, 7], False)


def test_replay_sample_trains_the_answer_within_the_limits():
    sample = replay_sample([1, 2, 3, 4], [7, 8, 9], LengthLimits(max_length=64))
    assert sample.input_ids == [1, 2, 3, 4, 7, 8, 9] and sample.labels == [IGNORE] * 4 + [7, 8, 9]
    cut = replay_sample(list(range(10, 20)), list(range(30, 40)), LengthLimits(max_length=12, max_target_length=5))
    assert len(cut.input_ids) <= 12 and cut.labels[-5:] == [30, 31, 32, 33, 34] and cut.labels.count(IGNORE) == len(cut) - 5


def test_cache_key_follows_what_changes_answers(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model.safetensors").write_bytes(b"x" * 100)
    first = folder_fingerprint(model)
    assert folder_fingerprint(model) == first and folder_fingerprint(None) is None
    (model / "config.json").write_text('{"hidden_size": 65}')
    assert folder_fingerprint(model) != first
    parts = {"model": first, "replay": ["a", "b"], "replay_max_new_tokens": 96}
    assert cache_key(parts) == cache_key(dict(reversed(parts.items())))
    assert cache_key(parts) != cache_key({**parts, "replay": ["b", "a"]}) != cache_key({**parts, "replay_max_new_tokens": 64})

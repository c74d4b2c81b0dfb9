"""Malformed data files: each gives exactly this message, naming file, line/record and field."""

from __future__ import annotations

import json

import pytest

from kubetune.api.spec import DatasetSpec
from kubetune.data.loader import DataError, load_datasets

GOOD = json.dumps({"prompt": "q", "response": "a"})

CASES = [
    # (file name, file text, dataset spec fields, expected message with {path} for the file)
    ("d.jsonl", GOOD + "\n{\"prompt\": \"q\",\n", {},
     "{path}:2: invalid JSON: Expecting property name enclosed in double quotes (column 16)"),
    ("d.json", '[\n {"prompt": "q", "response": "a"},\n {"prompt": }\n]', {},
     "{path}:3: invalid JSON: Expecting value"),
    ("d.jsonl", GOOD + "\n" + json.dumps({"prompt": "q2"}) + "\n", {},
     "1 of 2 records in {path} do not fit format 'prompt_response':\n"
     "{path}:2: response: missing (expected column 'response'; set spec.dataset.columns to rename)"),
    ("d.jsonl", json.dumps({"question": "q", "answer": "a"}) + "\n", {"columns": {"prompt": "question"}},
     "1 of 1 records in {path} do not fit format 'prompt_response':\n"
     "{path}:1: response: missing (expected column 'response'; set spec.dataset.columns to rename)"),
    ("d.json", json.dumps([json.loads(GOOD), 5]), {},
     "1 of 2 records in {path} do not fit format 'prompt_response':\n"
     "{path}: record 2: record: expected a JSON object, got int"),
    ("d.jsonl", json.dumps({"prompt": "q", "response": "a", "history": [["only one"]]}) + "\n", {},
     "1 of 1 records in {path} do not fit format 'prompt_response':\n"
     "{path}:1: history[0]: expected a [question, answer] pair"),
    ("d.jsonl", json.dumps({"prompt": "", "response": "a"}) + "\n", {},
     "1 of 1 records in {path} do not fit format 'prompt_response':\n{path}:1: prompt: is empty"),
    ("d.jsonl", json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}) + "\n",
     {"format": "sharegpt"},
     "1 of 1 records in {path} do not fit format 'sharegpt':\n"
     "{path}:1: conversations[1].from: expected one of human, user, gpt, assistant, system, got 'bot'"),
    ("d.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "a"}]}) + "\n", {"format": "openai"},
     "1 of 1 records in {path} do not fit format 'openai':\n"
     "{path}:1: messages[0].role: expected a user turn, got assistant (user and assistant turns must alternate, starting with user)"),
    ("d.jsonl", json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n", {"format": "openai"},
     "1 of 1 records in {path} do not fit format 'openai':\n"
     "{path}:1: messages: must end with an assistant turn (nothing to train on otherwise)"),
    ("d.jsonl", json.dumps({"conversation": [{"input": "q"}]}) + "\n", {"format": "conversation"},
     "1 of 1 records in {path} do not fit format 'conversation':\n{path}:1: conversation[0].output: missing"),
    ("d.jsonl", json.dumps({"text": 3}) + "\n", {"format": "text"},
     "1 of 1 records in {path} do not fit format 'text':\n{path}:1: text: expected a string, got int"),
    ("d.jsonl", GOOD + "\n" + "[" * 100_000 + "]" * 100_000 + "\n", {}, "{path}:2: invalid JSON: nested too deeply"),
    ("d.jsonl", '{"prompt": "q", "response": ' + "1" * 5000 + "}\n", {},
     "{path}:1: invalid JSON: a number has more than 4300 digits; write it as a string"),
    ("d.jsonl", '{"prompt": "\\ud800", "response": "a"}\n', {},
     "1 of 1 records in {path} do not fit format 'prompt_response':\n"
     "{path}:1: prompt: contains an unpaired surrogate ('\\ud800' escape) that no tokenizer can encode"),
    ("d.jsonl", "\n\n", {}, "dataset {path} contains no records"),
    ("d.json", "[]", {}, "dataset {path} contains no records"),
    ("d.jsonl", GOOD + "\n", {"format": "text", "columns": {"prompt": "q"}},
     "spec.dataset.columns.prompt does not apply to format 'text'; columns for 'text': text"),
    ("d.jsonl", GOOD + "\n", {"validation": {"ratio": 0.9}},
     "spec.dataset.validation.ratio 0.9 leaves no training data from 1 records"),
]


@pytest.mark.parametrize("name,text,fields,expected", CASES)
def test_malformed_data_gives_exact_message(tmp_path, name, text, fields, expected):
    path = tmp_path / name
    path.write_text(text)
    spec = DatasetSpec(uri=name, **fields)
    with pytest.raises(DataError) as err:
        load_datasets(spec, seed=0, cache_dir=tmp_path / "cache", base_dir=tmp_path)
    assert str(err.value) == expected.format(path=path)


def test_missing_file_and_many_errors_are_summarised(tmp_path):
    with pytest.raises(DataError) as err:
        load_datasets(DatasetSpec(uri="nope.jsonl"), seed=0, cache_dir=tmp_path, base_dir=tmp_path)
    assert str(err.value) == f"dataset nope.jsonl: {tmp_path / 'nope.jsonl'} does not exist"
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"prompt": "q"}) + "\n" for _ in range(8)))
    with pytest.raises(DataError) as err:
        load_datasets(DatasetSpec(uri="bad.jsonl"), seed=0, cache_dir=tmp_path, base_dir=tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"8 of 8 records in {tmp_path / 'bad.jsonl'} do not fit format 'prompt_response':"
    assert len(lines) == 7 and lines[-1] == "... and 3 more malformed records"


def test_json_lines_split_only_at_newline(tmp_path):
    text = json.dumps({"prompt": "a\u2028b\u0085c", "response": "d\u2029e"}, ensure_ascii=False) + "\n"
    (tmp_path / "d.jsonl").write_text(text, encoding="utf-8")
    train, _ = load_datasets(DatasetSpec(uri="d.jsonl"), seed=0, cache_dir=tmp_path / "cache", base_dir=tmp_path)
    assert train[0].messages == [{"role": "user", "content": "a\u2028b\u0085c"}, {"role": "assistant", "content": "d\u2029e"}]

"""Tokenize once: the tokenized dataset is cached beside the checkpoints and in the node's
cache; each input that changes the tokens changes the key (never a stale hit); a half-written
or damaged cache file is never read."""

from __future__ import annotations

import json
import shutil

import pytest
from trainer_helpers import write_jsonl

from kubetune.api.spec import FineTuneJobSpec
from kubetune.artifacts.storage import open_store
from kubetune.data.cache import PREFIX, TokenCache, read_tokenized, write_tokenized
from kubetune.data.loader import load_datasets
from kubetune.data.pipeline import tokenize_datasets
from kubetune.data.tokenize import CHATML_TEMPLATE
from kubetune.model.loader import load_tokenizer

RECORDS = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}", "q": f"Name {i}", "a": f"It is {i}.",
            "text": f"The number {i} is small."} for i in range(12)]  # fmt: skip


def make_spec(data, model_dir, **changes) -> FineTuneJobSpec:
    body = {
        "model": {"uri": str(model_dir)},
        "dataset": {"uri": str(data), "format": "prompt_response", "columns": {"prompt": "question", "response": "answer"},
                    "validation": {"ratio": 0.25}},
        "training": {"maxLength": 64},
    }  # fmt: skip
    for path, value in changes.items():  # "training.maxLength": 32
        *parents, leaf = path.split(".")
        node = body
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return FineTuneJobSpec.model_validate(body)


def tokens(spec: FineTuneJobSpec, tmp_path, cache=None):
    """(samples, stats, validation samples), source: the pipeline's own tokenization."""
    train, val = load_datasets(spec.dataset, spec.training.seed, tmp_path / "fetched")
    tokenizer = load_tokenizer(spec.model.uri, spec)
    return tokenize_datasets(spec, tokenizer, train, val, cache)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", RECORDS)


def test_tokenized_once_then_read_back_locally_or_from_beside_the_checkpoints(tiny_model_dir, data, tmp_path):
    spec = make_spec(data, tiny_model_dir)
    store = open_store(f"file://{tmp_path}/checkpoints")
    fresh, source = tokens(spec, tmp_path)
    assert source == "tokenized"
    first, source = tokens(spec, tmp_path, TokenCache(store, tmp_path / "node-a"))
    assert source == "tokenized" and first == fresh
    shared = [o.key for o in store.list(PREFIX + "/")]
    assert len(shared) == 1 and (tmp_path / "node-a" / shared[0].split("/")[1]).is_file()

    assert tokens(spec, tmp_path, TokenCache(store, tmp_path / "node-a")) == (fresh, "local")
    assert tokens(spec, tmp_path, TokenCache(store, tmp_path / "node-b")) == (fresh, "fetched")  # a fresh node
    # Found on a node (another job tokenized it there) but not beside this job's checkpoints:
    # shared there for this job's other nodes and restarts.
    other = open_store(f"file://{tmp_path}/other-checkpoints")
    assert tokens(spec, tmp_path, TokenCache(other, tmp_path / "node-a")) == (fresh, "local")
    assert [o.key for o in other.list(PREFIX + "/")] == shared


def with_other_tokenizer_files(model_dir, dest):
    """A copy of the model whose tokenizer knows one more token ("plus", in every prompt)."""
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    tokenizer.add_tokens(["plus"])
    tokenizer.save_pretrained(dest)
    return dest


OTHER_TEMPLATE = CHATML_TEMPLATE.replace("message['role'] + '\n'", "message['role'] + ':\n'").replace("assistant\n'", "assistant:\n'")


def test_every_input_that_changes_the_tokens_changes_the_key(tiny_model_dir, data, tmp_path):
    store = open_store(f"file://{tmp_path}/checkpoints")
    changed_data = write_jsonl(tmp_path / "changed.jsonl", [{**RECORDS[0], "answer": "zero"}] + RECORDS[1:])
    variants = {
        "as first cached": {},
        "data file content": {"dataset.uri": str(changed_data)},
        "tokenizer files": {"model.uri": str(with_other_tokenizer_files(tiny_model_dir, tmp_path / "model-b"))},
        "chat template": {"model.chatTemplate": OTHER_TEMPLATE},
        "maxLength": {"training.maxLength": 12},
        "maxSourceLength": {"training.maxSourceLength": 4},
        "maxTargetLength": {"training.maxTargetLength": 1},
        "columns": {"dataset.columns": {"prompt": "q", "response": "a"}},
        "format": {"dataset.format": "text", "dataset.columns": {}},
    }
    seen = []
    for what, changes in variants.items():
        spec = make_spec(data, tiny_model_dir, **changes)
        expected, _ = tokens(spec, tmp_path)
        got, source = tokens(spec, tmp_path, TokenCache(store, tmp_path / "node"))
        assert source == "tokenized", what  # never served from an earlier input's cache
        assert got == expected, what
        assert expected not in seen, what  # the change did change the tokens
        seen.append(expected)
    # Back to the first input: tokenized again (the job keeps one copy beside its checkpoints),
    # then found in the node's cache.
    assert len(store.list(PREFIX + "/")) == 1
    assert tokens(make_spec(data, tiny_model_dir), tmp_path, TokenCache(store, tmp_path / "node")) == (seen[0], "local")


def saved_config(tokenizer, folder) -> dict:
    tokenizer.save_pretrained(folder)
    return json.loads((folder / "tokenizer_config.json").read_text())


def test_how_the_tokenizer_was_loaded_is_not_part_of_the_key(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from kubetune.data.cache import tokenizer_digest

    # HF_HUB_OFFLINE (set in some environments, not in others) turns on local_files_only,
    # which the tokenizer records in the tokenizer_config.json it saves.
    offline, online = (AutoTokenizer.from_pretrained(tiny_model_dir) for _ in range(2))
    online.init_kwargs["local_files_only"] = not offline.init_kwargs["local_files_only"]
    assert saved_config(offline, tmp_path / "a") != saved_config(online, tmp_path / "b")
    assert tokenizer_digest(offline) == tokenizer_digest(online)
    online.add_tokens(["plus"])
    assert tokenizer_digest(offline) != tokenizer_digest(online)


def test_a_half_written_or_damaged_cache_file_is_never_read(tiny_model_dir, data, tmp_path, caplog):
    spec = make_spec(data, tiny_model_dir)
    store = open_store(f"file://{tmp_path}/checkpoints")
    expected, _ = tokens(spec, tmp_path, TokenCache(store, tmp_path / "node"))
    (key_file,) = (tmp_path / "node").glob("*.npz")

    # A writer killed halfway leaves only its temporary file: the name a reader opens is
    # written by one rename, complete.
    write_tokenized(tmp_path / "elsewhere" / key_file.name, expected)
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == [key_file.name]
    key_file.rename(key_file.with_name(f".{key_file.name}.1234.tmp"))
    assert tokens(spec, tmp_path, TokenCache(store, tmp_path / "node")) == (expected, "fetched")

    # A damaged local copy (cut short) is refused and replaced by the shared one.
    key_file.write_bytes(key_file.read_bytes()[: key_file.stat().st_size // 2])
    assert read_tokenized(key_file) is None and "unreadable tokenized-data cache" in caplog.text
    assert tokens(spec, tmp_path, TokenCache(store, tmp_path / "node")) == (expected, "fetched")

    # Both damaged: tokenized again.
    shared = tmp_path / "checkpoints" / PREFIX / key_file.name
    shared.write_bytes(b"not a cache")
    key_file.write_bytes(b"not a cache either")
    assert tokens(spec, tmp_path, TokenCache(store, tmp_path / "node")) == (expected, "tokenized")
    assert read_tokenized(shared) == expected


def test_statistics_travel_with_the_tokens(tiny_model_dir, tmp_path):
    long_answer = {"question": "Say a lot", "answer": "word " * 200, "q": "", "a": "", "text": ""}
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS + [long_answer])
    spec = make_spec(data, tiny_model_dir, **{"dataset.validation": None})
    (samples, stats, _), _ = tokens(spec, tmp_path, TokenCache(None, tmp_path / "node"))
    assert stats.truncated == 1 and stats.samples == len(samples) == len(RECORDS) + 1
    (_, cached_stats, _), source = tokens(spec, tmp_path, TokenCache(None, tmp_path / "node"))
    assert source == "local" and cached_stats == stats
    assert json.loads(json.dumps(stats.__dict__)) == cached_stats.__dict__

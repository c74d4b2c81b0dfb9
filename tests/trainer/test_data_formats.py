"""Every input format becomes the same message list; labels train exactly the assistant answers."""

from __future__ import annotations

import json

import pytest
from trainer_helpers import trained_runs, write_jsonl

from kubetune.api.spec import DatasetSpec
from kubetune.data.converters import resolve_columns, to_messages
from kubetune.data.loader import load_datasets, load_examples
from kubetune.data.tokenize import LengthLimits, TemplateError, install_chat_template, tokenize_messages, tokenize_text

SYS = {"role": "system", "content": "Be brief."}
U1, A1 = {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}
U2, A2 = {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}

CASES = [
    ("prompt_response", {}, {"prompt": "q2", "response": "a2", "history": [["q1", "a1"]], "system": "Be brief."}, [SYS, U1, A1, U2, A2]),
    ("prompt_response", {"prompt": "question", "response": "answer"}, {"question": "q1", "answer": "a1"}, [U1, A1]),
    ("alpaca", {}, {"instruction": "Translate", "input": "hi", "output": "salut"},
     [{"role": "user", "content": "Translate\nhi"}, {"role": "assistant", "content": "salut"}]),
    ("alpaca", {}, {"instruction": "q2", "input": "", "output": "a2", "system": "Be brief.", "history": [["q1", "a1"]]}, [SYS, U1, A1, U2, A2]),
    ("conversation", {}, {"conversation": [{"system": "Be brief.", "input": "q1", "output": "a1"}, {"input": "q2", "output": "a2"}]},
     [SYS, U1, A1, U2, A2]),
    ("openai", {}, {"messages": [SYS, U1, A1, U2, A2]}, [SYS, U1, A1, U2, A2]),
    ("openai", {}, {"conversations": [U1, A1]}, [U1, A1]),
    ("sharegpt", {}, {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q1"},
                                        {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
     [SYS, U1, A1, U2, A2]),
    ("sharegpt", {"messages": "dialog"}, {"dialog": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]}, [U1, A1]),
    ("text", {}, {"text": "plain words"}, [{"role": "assistant", "content": "plain words"}]),
    ("text", {}, {"content": "plain words"}, [{"role": "assistant", "content": "plain words"}]),
]


@pytest.mark.parametrize("fmt,columns,record,expected", CASES)
def test_conversion_exact_messages(fmt, columns, record, expected):
    spec = DatasetSpec(uri="x.jsonl", format=fmt, columns=columns)
    assert to_messages(record, fmt, resolve_columns(fmt, spec.columns)) == expected


def test_every_assistant_turn_is_trained_and_nothing_else(tiny_tokenizer):
    sample, truncated = tokenize_messages(tiny_tokenizer, [SYS, U1, A1, U2, A2], LengthLimits(256))
    assert not truncated
    assert trained_runs(tiny_tokenizer, sample) == ["a1<|im_end|>\n", "a2<|im_end|>\n"]
    prompt_text = tiny_tokenizer.decode([t for t, l in zip(sample.input_ids, sample.labels) if l == -100])
    assert prompt_text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.decode(sample.input_ids) == tiny_tokenizer.apply_chat_template([SYS, U1, A1, U2, A2], tokenize=False)


def test_plain_text_trains_every_token_but_the_first(tiny_tokenizer):
    sample, _ = tokenize_text(tiny_tokenizer, "plain words", LengthLimits(64))
    assert tiny_tokenizer.decode(sample.input_ids) == "plain words<|im_end|>"
    assert sample.labels[0] == -100 and sample.labels[1:] == sample.input_ids[1:]


def _lengths(tokenizer, sample):
    return len(sample), sample.trained_tokens


def test_truncation_rules(tiny_tokenizer):
    long_q = {"role": "user", "content": "question " * 40}
    long_a = {"role": "assistant", "content": "answer " * 40}
    # Rule 1: answers cut from the right to maxTargetLength.
    sample, truncated = tokenize_messages(tiny_tokenizer, [U1, long_a], LengthLimits(512, max_target_length=5))
    assert truncated and sample.trained_tokens == 5
    assert trained_runs(tiny_tokenizer, sample)[0].startswith("an")
    # Rule 2: prompts cut from the left to maxSourceLength, keeping the assistant header.
    sample, _ = tokenize_messages(tiny_tokenizer, [long_q, A1], LengthLimits(512, max_source_length=6))
    prompt = [t for t, l in zip(sample.input_ids, sample.labels) if l == -100]
    assert tiny_tokenizer.decode(prompt) == "\n<|im_start|>assistant\n"
    # Rule 3: later turns dropped whole while too long.
    full, _ = tokenize_messages(tiny_tokenizer, [U1, A1, U2, A2], LengthLimits(512))
    first, _ = tokenize_messages(tiny_tokenizer, [U1, A1], LengthLimits(512))
    sample, truncated = tokenize_messages(tiny_tokenizer, [U1, A1, U2, A2], LengthLimits(len(full) - 1))
    assert truncated and sample.input_ids == first.input_ids
    # Rule 4: one long turn: prompt keeps >= maxLength // 2 from its end, answer cut to fit.
    sample, _ = tokenize_messages(tiny_tokenizer, [long_q, long_a], LengthLimits(40))
    assert len(sample) == 40 and sample.trained_tokens == 20


def test_missing_chat_template_names_the_field(tmp_path):
    from kubetune.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=None)
    with pytest.raises(TemplateError) as err:
        install_chat_template(tok, None, "s3://models/base")
    assert str(err.value) == (
        "the tokenizer of s3://models/base has no chat template; set spec.model.chatTemplate to the model's "
        "Jinja chat template (or to 'chatml' to use ChatML explicitly), or use spec.dataset.format text for "
        "plain-text training"
    )
    install_chat_template(tok, "chatml", "s3://models/base")
    sample, _ = tokenize_messages(tok, [U1, A1], LengthLimits(64))
    assert trained_runs(tok, sample) == ["a1<|im_end|>\n"]


def test_json_array_and_jsonl_and_validation_split(tmp_path):
    records = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    (tmp_path / "data.json").write_text(json.dumps(records, indent=1))
    write_jsonl(tmp_path / "data.jsonl", records)
    for name in ("data.json", "data.jsonl"):
        spec = DatasetSpec(uri=name, validation={"ratio": 0.2})
        train, val = load_datasets(spec, seed=1, cache_dir=tmp_path / "cache", base_dir=tmp_path)
        assert len(train) == 8 and len(val) == 2
        assert sorted(e.messages[0]["content"] for e in train + val) == sorted(f"q{i}" for i in range(10))
    spec = DatasetSpec(uri="data.jsonl", validation={"uri": "data.json", "maxSamples": 3})
    train, val = load_datasets(spec, seed=1, cache_dir=tmp_path / "cache", base_dir=tmp_path)
    assert len(train) == 10 and len(val) == 3
    assert val[0].source == f"{tmp_path / 'data.json'}: record 1"


def test_dataset_from_s3(tmp_path, s3_env, seaweed):
    body = "".join(json.dumps({"instruction": f"i{i}", "output": f"o{i}"}) + "\n" for i in range(3))
    seaweed.client().put_object(Bucket="data", Key="sets/alpaca.jsonl", Body=body.encode())
    spec = DatasetSpec(uri="s3://data/sets/alpaca.jsonl", format="alpaca")
    examples = load_examples(spec.uri, spec, tmp_path / "cache")
    assert [e.messages for e in examples][2] == [{"role": "user", "content": "i2"}, {"role": "assistant", "content": "o2"}]
    assert examples[1].source == "s3://data/sets/alpaca.jsonl:2"


def test_a_template_refusing_a_conversation_names_the_record(tiny_tokenizer):
    from kubetune.data.loader import Example
    from kubetune.data.tokenize import tokenize_examples

    strict = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    good, _ = tokenize_examples(strict, [Example([U1, A1], "d.jsonl:1")], LengthLimits(64), plain_text=False)
    assert trained_runs(strict, good[0]) == [" a1\n"]  # the space merged into the answer's first token
    with pytest.raises(TemplateError) as err:
        tokenize_examples(strict, [Example([SYS, U1, A1], "d.jsonl:2")], LengthLimits(64), plain_text=False)
    assert str(err.value) == (
        "d.jsonl:2: the chat template refused this conversation (System role not supported); some templates accept "
        "no system turn or need strictly alternating turns: fix the data or set spec.model.chatTemplate"
    )

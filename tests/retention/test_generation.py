"""Replay generation on the tiny model: the same answers for the same seed whatever the
number of ranks, written once to the cache beside the checkpoints and read back instead of
generating again."""

from __future__ import annotations

import json

import pytest
import torch

from kubetune.api.spec import FineTuneJob
from kubetune.artifacts.storage import open_store
from kubetune.data.loader import Example
from kubetune.data.tokenize import LengthLimits
from kubetune.retention import Retention
from kubetune.retention.generate import answer_share
from kubetune.retention.phase import prompt_ids

DS_CONFIG = {"zero_optimization": {"stage": 2}}


def examples(n: int) -> list[Example]:
    return [Example([{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}], f"d.jsonl:{i + 1}") for i in range(n)]


def job(model_dir, seed: int = 1234, **retention) -> FineTuneJob:
    retention = {"replay": {"ratio": 0.5, "maxNewTokens": 8}, "probes": {"maxNewTokens": 4}, "batchSize": 8, **retention}
    return FineTuneJob.model_validate(
        {"metadata": {"name": "r"}, "spec": {"model": {"uri": str(model_dir)}, "dataset": {"uri": "d.jsonl"},
                                             "training": {"seed": seed}, "retention": retention}}
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_ranks_share_the_work_and_get_the_answers_of_one_process(tiny):
    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, q) for q in ["Hi", "What is 2 plus 2?", "你好，世界", "Name a colour, please.", "Why?"]]
    alone = answer_share(model, tokenizer, prompts, 6, 2, rank=0, world=1, synced=False, device=torch.device("cpu"))
    first = answer_share(model, tokenizer, prompts, 6, 2, rank=0, world=2, synced=False, device=torch.device("cpu"))
    second = answer_share(model, tokenizer, prompts, 6, 2, rank=1, world=2, synced=False, device=torch.device("cpu"))
    assert set(first) & set(second) == set() and set(first) | set(second) == set(range(5))
    assert {**first, **second} == alone
    assert all(len(ids) == 6 or finished for ids, finished, _ in alone.values())


def test_each_replayed_token_keeps_the_distribution_it_was_drawn_from(tiny):
    # Left-padded in one batch, with a KV cache: the recorded distributions are those of one
    # plain forward pass over prompt + answer, which is what training compares with.
    from kubetune.train.loss import top_k_distribution

    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, q) for q in ["Hi", "What is 2 plus 2?", "Name a colour, please, and say why you like it."]]
    answers = answer_share(model, tokenizer, prompts, 7, 3, rank=0, world=1, synced=False, device=torch.device("cpu"), top_k=8)
    for i, prompt in enumerate(prompts):
        ids, finished, targets = answers[i]
        assert len(targets) == len(ids) > 0 and targets.ids.shape == (len(ids), 8) and targets.logp.shape == (len(ids), 9)
        assert targets.ids[:, 0].tolist() == ids  # greedy: each answer token is its distribution's most likely one
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
        top, logp = top_k_distribution(logits, 8)
        assert torch.equal(top, targets.ids)
        assert torch.allclose(logp, targets.logp, atol=1e-4)
    # Without top_k nothing is kept (probes, rewrites).
    assert all(t is None for _, _, t in answer_share(model, tokenizer, prompts, 7, 3, rank=0, world=1, synced=False, device=torch.device("cpu")).values())


def prepare(retention: Retention, model_dir, store, tokenizer, build) -> dict:
    key = retention.key(job(model_dir), tokenizer, model_dir, None, "fp32")
    retention.prepare(store, key, tokenizer, build, DS_CONFIG, rank=0, world=1, device=torch.device("cpu"))
    return retention.info


def test_generation_is_deterministic_for_a_seed_and_cached(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    builds = []

    def build():
        builds.append(1)
        return model

    store = open_store(str(tmp_path / "checkpoints"))
    first = Retention.plan(job(tiny_model_dir), examples(40), cache_dir=tmp_path / "c")
    info = prepare(first, tiny_model_dir, store, tokenizer, build)
    assert len(first.sets.replay) == 20 and info["cached"] is False and len(builds) == 1
    cached, targets = sorted(store.list("retention/"), key=lambda o: not o.key.endswith(".json"))
    assert info["cache"] == f"{store.root}/{cached.key}" and targets.key.endswith(".safetensors")
    document = json.loads(store.get_bytes(cached.key))
    assert [r["prompt"] for r in document["replay"]] == first.sets.replay
    assert len(document["probes"]) == len(first.sets.probes) and all(len(r["ids"]) <= 8 for r in document["replay"])

    # Again (a restart, a resumed run): read from the cache, nothing built or generated.
    again = Retention.plan(job(tiny_model_dir), examples(40), cache_dir=tmp_path / "c")
    assert prepare(again, tiny_model_dir, store, tokenizer, build)["cached"] is True and len(builds) == 1
    assert again.base.replay == first.base.replay and again.base.probes == first.base.probes
    for read, made in zip(again.base.replay, first.base.replay):  # the base's distributions come back too
        assert torch.equal(read.targets.ids, made.targets.ids) and torch.equal(read.targets.logp, made.targets.logp)
    assert 0.0 < again.info["replay_top_k_mass"] <= 1.0
    samples = again.replay_samples(tokenizer, LengthLimits(64), loss="kl")
    assert len(samples) == 20 and again.info["samples"] == 20
    assert all(torch.equal(s.distill.ids, a.targets.ids) for s, a in zip(samples, again.base.replay))
    assert all(s.distill is None for s in again.replay_samples(tokenizer, LengthLimits(64), loss="tokens"))

    # Elsewhere, from scratch, with the same seed: the same prompts and answers, byte for byte.
    other = open_store(str(tmp_path / "elsewhere"))
    prepare(Retention.plan(job(tiny_model_dir), examples(40), cache_dir=tmp_path / "c"), tiny_model_dir, other, tokenizer, build)
    assert other.get_bytes(cached.key) == store.get_bytes(cached.key) and len(builds) == 2
    assert other.get_bytes(targets.key) == store.get_bytes(targets.key)

    # Another seed replays other prompts: another cache entry.
    reseeded = Retention.plan(job(tiny_model_dir, seed=99), examples(40), cache_dir=tmp_path / "c")
    assert reseeded.sets.replay != first.sets.replay
    assert reseeded.key(job(tiny_model_dir, seed=99), tokenizer, tiny_model_dir, None, "fp32") != first.key(job(tiny_model_dir), tokenizer, tiny_model_dir, None, "fp32")


def test_a_damaged_cache_is_answered_again(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    store = open_store(str(tmp_path / "checkpoints"))
    retention = Retention.plan(job(tiny_model_dir), examples(10), cache_dir=tmp_path / "c")
    prepare(retention, tiny_model_dir, store, tokenizer, lambda: model)
    for damaged in store.list("retention/"):  # the answers, then the base's distributions
        good = store.get_bytes(damaged.key)
        store.put_bytes(damaged.key, good[: len(good) // 2])
        again = Retention.plan(job(tiny_model_dir), examples(10), cache_dir=tmp_path / "c")
        assert prepare(again, tiny_model_dir, store, tokenizer, lambda: model)["cached"] is False, damaged.key
        assert store.get_bytes(damaged.key) == good
    # Answers without their distributions (a put lost between the two): answered again.
    (targets,) = [o.key for o in store.list("retention/") if o.key.endswith(".safetensors")]
    store.delete([targets])
    again = Retention.plan(job(tiny_model_dir), examples(10), cache_dir=tmp_path / "c")
    assert prepare(again, tiny_model_dir, store, tokenizer, lambda: model)["cached"] is False
    assert targets in [o.key for o in store.list("retention/")]


def test_rewrites_are_cached_and_trained_with_the_users_answers(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    store = open_store(str(tmp_path / "checkpoints"))
    spec = job(tiny_model_dir, paraphrases={"count": 2, "maxNewTokens": 8})
    data = examples(3) + [Example([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"},
                                   {"role": "assistant", "content": "Bye"}], "d.jsonl:4")]  # fmt: skip
    first = Retention.plan(spec, data, cache_dir=tmp_path / "c")
    assert first.questions == ["What is 0 plus 0?", "What is 1 plus 1?", "What is 2 plus 2?"]  # the conversation is not rewritten
    key = first.key(spec, tokenizer, tiny_model_dir, None, "fp32")
    first.prepare(store, key, tokenizer, lambda: model, DS_CONFIG, rank=0, world=1, device=torch.device("cpu"))
    assert [len(w) for w in first.base.rewrites] == [6, 6, 6] and first.info["rewrite_questions"] == 3
    again = Retention.plan(spec, data, cache_dir=tmp_path / "c")
    again.prepare(store, key, tokenizer, lambda: pytest.fail("the cache should answer"), DS_CONFIG, rank=0, world=1, device=torch.device("cpu"))
    assert again.base.cached and again.base.rewrites == first.base.rewrites
    # More rewrites wanted, or other questions: another cache entry.
    fewer = job(tiny_model_dir, paraphrases={"count": 1, "maxNewTokens": 8})
    assert key != Retention.plan(fewer, data, cache_dir=tmp_path / "c").key(fewer, tokenizer, tiny_model_dir, None, "fp32")
    assert key != Retention.plan(spec, examples(2), cache_dir=tmp_path / "c").key(spec, tokenizer, tiny_model_dir, None, "fp32")

    # What the base model wrote decides the samples: the checked rewrites, each with the user's own answer.
    again.base.rewrites = [["What is 0 plus 0?", "How much is 0 plus 0?", "What does 0 plus 0 make?", "What is 9 plus 0?"], [], ["Tell me"]]
    samples = again.reworded_samples(tokenizer, LengthLimits(64))
    assert again.info["reworded_questions"] == 1 and again.info["reworded_samples"] == 2
    texts = [tokenizer.decode(s.input_ids) for s in samples]
    assert "How much is 0 plus 0?" in texts[0] and "What does 0 plus 0 make?" in texts[1]
    answers = [tokenizer.decode([t for t in s.labels if t >= 0]) for s in samples]
    assert all(a.strip().startswith("0") for a in answers)  # the answer "0" is what is trained


def test_no_rewrites_without_paraphrases(tiny_model_dir, tmp_path):
    retention = Retention.plan(job(tiny_model_dir), examples(3), cache_dir=tmp_path / "c")
    assert retention.questions == [] and retention.spec.paraphrases.count == 0

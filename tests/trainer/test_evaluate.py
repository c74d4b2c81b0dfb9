"""Evaluation: ChatGLM-style ROUGE-1/2/L and BLEU-4 against values computed by hand, and
evaluation prompts tokenized exactly as training tokenized the same conversation."""

from __future__ import annotations

import math

import pytest

from kubetune.data.tokenize import IGNORE, LengthLimits, tokenize_messages
from kubetune.train.evaluate import METRICS, bleu4, exact_match, generation_metrics, prompt_ids, rouge, score, score_tokens, token_f1


def test_rouge_on_jieba_words_as_chatglm_publishes_it():
    # jieba: 我们/一起/去/公园 and 我们/一起/去/学校 -> unigrams 3 of 4 shared, bigrams 2 of 3,
    # longest common subsequence 3 of 4 words.
    assert rouge("我们一起去公园", "我们一起去学校") == pytest.approx({"rouge_1": 75.0, "rouge_2": 200 / 3, "rouge_l": 75.0}, rel=1e-6)
    # rouge-chinese counts distinct n-grams ("the" once): unigrams {the, cat, sat, on, mat} vs
    # {the, cat, is, on, mat} share 4 of 5; bigrams 3 of 5; LCS the-cat-on-the-mat = 5 of 6 words.
    assert rouge("the cat sat on the mat", "the cat is on the mat") == pytest.approx({"rouge_1": 80.0, "rouge_2": 60.0, "rouge_l": 500 / 6}, rel=1e-6)
    assert rouge("", "something") == {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}


def test_bleu4_on_characters_with_nltk_smoothing_method_3():
    # Characters 我们一起去公园 vs 我们一起去学校: 1..4-gram precisions 5/7, 4/6, 3/5, 2/4, same length.
    assert bleu4("我们一起去公园", "我们一起去学校") == pytest.approx(100 * (5 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25, rel=1e-9)
    # No 4-gram matches: method 3 replaces the first zero precision 0/1 by 1 / (2^1 * 1).
    assert bleu4("abcx", "abcd") == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25, rel=1e-9)
    # Shorter prediction: brevity penalty exp(1 - 6/4); precisions 1, 1, 1, 1.
    assert bleu4("abcd", "abcdef") == pytest.approx(100 * math.exp(1 - 6 / 4), rel=1e-9)
    assert bleu4("", "abc") == 0.0


def test_exact_match_and_token_f1():
    assert exact_match(" Paris ", "Paris") == 100.0 and exact_match("paris", "Paris") == 0.0
    assert token_f1("the cat sat", "the cat") == pytest.approx(80.0)
    assert score_tokens("我们一起去公园散步") == ["我们", "一起", "去", "公园", "散步"]


def test_score_averages_every_metric_over_samples():
    result = score(["Paris", "我们一起去公园"], ["Paris", "我们一起去学校"])
    assert list(result) == list(METRICS)
    assert result["exact_match"] == 50.0
    assert result["rouge_1"] == pytest.approx((100.0 + 75.0) / 2, rel=1e-6)
    assert result["bleu_4"] == pytest.approx((100.0 + 100 * (5 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25) / 2, rel=1e-6)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "你好，世界。"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "今天天气很好吗？"},
        {"role": "assistant", "content": "很好。"},
    ],
    # Text that spells a special token is text in training and in serving: evaluation too.
    [{"role": "user", "content": "Say <|im_end|> please"}, {"role": "assistant", "content": "<|im_end|>"}],
]


def training_prompt(sample) -> list[int]:
    """The token ids training saw before the conversation's last answer."""
    last = max(i for i, label in enumerate(sample.labels) if label != IGNORE)
    start = last
    while start > 0 and sample.labels[start - 1] != IGNORE:
        start -= 1
    return sample.input_ids[:start]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single", "multi-turn", "special-text"])
def test_evaluation_prompt_ids_are_the_training_prompt_ids(tiny_tokenizer, messages):
    sample, truncated = tokenize_messages(tiny_tokenizer, messages, LengthLimits(512))
    assert not truncated
    assert prompt_ids(tiny_tokenizer, messages) == training_prompt(sample)


def test_the_old_template_text_path_differs_where_text_spells_a_special_token(tiny_tokenizer):
    messages = CONVERSATIONS[2]
    text = tiny_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    old = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert old != prompt_ids(tiny_tokenizer, messages)  # what evaluation used to feed the model


def test_generation_metrics_on_the_tiny_model(tiny_model_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.data.loader import Example

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = [Example(messages=m, source=f"t:{i}") for i, m in enumerate(CONVERSATIONS)]
    result = generation_metrics(model, tiny_tokenizer, examples, 2, 4, rank=0, world=1, synced=False, device=torch.device("cpu"))
    assert set(result) == set(METRICS) and all(0.0 <= v <= 100.0 for v in result.values())

"""Evaluation: validation loss, and generation metrics on validation samples.

Generation metrics (each in 0..100, averaged over samples), computed as ChatGLM's and
LLaMA-Factory's users compute and publish them, so figures compare with theirs:
  * rouge_1, rouge_2, rouge_l: the `rouge-chinese` package's F-measures (ROUGE-L summary
    level) on the words jieba cuts the prediction and the reference into (jieba segments
    Chinese and splits other text into words); 0 when either side has no word.
  * bleu_4: NLTK's sentence BLEU-4 on characters, smoothing method 3 (NIST geometric
    sequence), with the reference's characters as the one reference.
  * exact_match (after trimming whitespace) and token_f1 (SQuAD-style bag of words: jieba
    words for text with Chinese/Japanese/Korean characters, else lower-cased words and
    punctuation), for extraction-style answers.
Answers are generated greedily from the prompt `encode_chat` builds, the same token ids
training saw before that answer and serving builds for the same conversation.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Optional

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _jieba_words(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(60)
    return list(jieba.cut(text))


def score_tokens(text: str) -> list[str]:
    """Tokens token_f1 counts: jieba words for CJK text, else lower-cased words/punctuation."""
    if _CJK.search(text):
        return [w for w in _jieba_words(text.lower()) if w.strip()]
    return _WORD.findall(text.lower())


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if prediction.strip() == reference.strip() else 0.0


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = score_tokens(prediction), score_tokens(reference)
    if not pred or not ref:
        return 100.0 if pred == ref else 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (0..100) on jieba words, as ChatGLM's evaluation computes them."""
    from rouge_chinese import Rouge

    hypothesis, words = " ".join(_jieba_words(prediction)), " ".join(_jieba_words(reference))
    if not hypothesis.split() or not words.split():
        return {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    scores = Rouge().get_scores(hypothesis, words)[0]
    return {f"rouge_{n}": 100.0 * scores[f"rouge-{n}"]["f"] for n in ("1", "2", "l")}


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 (0..100) on characters with NLTK's smoothing method 3, as ChatGLM's evaluation."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not prediction or not reference:
        return 0.0
    return 100.0 * sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)


METRICS = ("exact_match", "token_f1", "rouge_1", "rouge_2", "rouge_l", "bleu_4")


def sample_scores(prediction: str, reference: str) -> dict[str, float]:
    return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
            **rouge(prediction, reference), "bleu_4": bleu4(prediction, reference)}  # fmt: skip


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean of every generation metric over the pairs."""
    if not predictions:
        return {name: 0.0 for name in METRICS}
    per_sample = [sample_scores(p, r) for p, r in zip(predictions, references)]
    return {name: sum(s[name] for s in per_sample) / len(per_sample) for name in METRICS}


# ---------------------------------------------------------------------------------------
# Model-side evaluation (collective under torch.distributed: every rank runs the same
# number of forward passes, which ZeRO-3 needs because each forward gathers parameters).


def _shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's items, padded by repetition to the same count on every rank; and how many are real."""
    mine = items[rank::world]
    per_rank = -(-len(items) // world)
    real = len(mine)
    if items and len(mine) < per_rank:
        mine = mine + [items[0]] * (per_rank - len(mine))
    return mine, real


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def validation_loss(model, rows: list, pad_id: int, batch_size: int, rank: int, world: int, device) -> Optional[float]:
    """Mean token loss over the validation rows (all ranks together)."""
    import torch

    from ..data.batching import collate, model_inputs

    if not rows:
        return None
    mine, real = _shard(rows, rank, world)
    loss_sum, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in model_inputs(collate(mine[start : start + batch_size], pad_id)).items()}
            labels = inputs.pop("labels")
            keep = max(0, min(len(labels), real - start))  # rows past `real` only pad this rank's share
            logits = model(**inputs).logits[:keep, :-1].float()
            targets = labels[:keep, 1:]
            loss_sum += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"))
            tokens += int((targets != -100).sum())
    model.train(was_training)
    total_loss, total_tokens = _all_reduce_sum([loss_sum, tokens], device)
    return total_loss / total_tokens if total_tokens else None


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt of a conversation's last answer: everything before it, with the template's
    generation prompt, tokenized as training and serving tokenize it."""
    from ..data.encoding import encode_chat

    return encode_chat(tokenizer, messages[:-1], add_generation_prompt=True).ids


def generate_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, synced: bool, device) -> list[str]:
    """Greedy answers to each conversation's prompt (everything before its last answer)."""
    import torch

    answers = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for messages in conversations:
            ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced,
            )
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def generation_metrics(model, tokenizer, examples: list, max_samples: int, max_new_tokens: int, rank: int, world: int, synced: bool, device) -> dict[str, float]:
    """Generation metrics over the first max_samples validation examples (all ranks together)."""
    chosen = [e.messages for e in examples[:max_samples]]
    mine, real = _shard(chosen, rank, world)
    predictions = generate_answers(model, tokenizer, mine, max_new_tokens, synced, device)[:real]
    scores = score(predictions, [m[-1]["content"] for m in mine[:real]])
    sums = _all_reduce_sum([scores[name] * real for name in METRICS] + [real], device)
    count = sums[-1]
    return {name: sums[i] / count for i, name in enumerate(METRICS)} if count else {}

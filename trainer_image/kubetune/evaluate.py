"""Evaluation: validation loss, and generation metrics on validation samples.

Generation metrics (each in 0..100, averaged over samples): exact match (after trimming
whitespace), token F1 (bag of tokens, SQuAD style), ROUGE-L F-measure (longest common
subsequence) and sentence BLEU-4 (uniform weights, brevity penalty, add-one smoothing for
2..4-grams as in Lin & Och 2004). Text containing Chinese/Japanese/Korean characters is
split into words with jieba (not on whitespace, which would make a whole sentence one
token); other text is lower-cased and split into words and punctuation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def score_tokens(text: str) -> list[str]:
    """Tokens used for scoring: jieba words for CJK text, else lower-cased words/punctuation."""
    if _CJK.search(text):
        import jieba

        jieba.setLogLevel(60)
        return [w for w in jieba.lcut(text.lower()) if w.strip()]
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


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = score_tokens(prediction), score_tokens(reference)
    lcs = _lcs(pred, ref) if pred and ref else 0
    if lcs == 0:
        return 100.0 if not pred and not ref else 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(prediction: str, reference: str) -> float:
    pred, ref = score_tokens(prediction), score_tokens(reference)
    if not pred or not ref:
        return 0.0
    log_precision = 0.0
    for n in range(1, 5):
        matches = sum((_ngrams(pred, n) & _ngrams(ref, n)).values())
        total = max(len(pred) - n + 1, 0)
        if n == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total) / 4
        else:
            log_precision += math.log((matches + 1) / (total + 1)) / 4
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return 100.0 * brevity * math.exp(log_precision)


METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "bleu_4": bleu4}


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean of every generation metric over the pairs."""
    if not predictions:
        return {name: 0.0 for name in METRICS}
    return {name: sum(fn(p, r) for p, r in zip(predictions, references)) / len(predictions) for name, fn in METRICS.items()}


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

    from .data.batching import collate, model_inputs

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


def generate_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, synced: bool, device) -> list[str]:
    """Greedy answers to each conversation's prompt (everything before its last answer)."""
    import torch

    answers = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for messages in conversations:
            text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
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

"""How much general knowledge a tuned model kept: the probe figures (pure).

Every probe has reference phrases; an answer is right when it contains one of them
(case-insensitive; the same rule `kubetune run --questions` scores with). The base model and
the tuned model answer the same probes greedily. The figure is

    kept = probes the base answered right that the tuned model still answers right
    kept_ratio = kept / base_right

Why this measure: it asks whether a fact the model knew survived training, which is what
forgetting is. Probes the base got wrong carry no knowledge to keep, so they are left out of
the ratio (a tuned model that now gets them right is counted separately as `gained`). A
reference check is decided by the answer's content, not its wording: a tuned model that says
"Paris is France's capital" instead of "The capital of France is Paris." kept the fact,
while one that answers "Lantern Tide" did not, however similar the sentences look. Text
similarity (word overlap, or sentence embeddings) gets both of those wrong, and embedding
models that run offline here are English-only, while probes are English and Chinese.
How far the wording moved is still reported beside it: `unchanged` answers (identical text)
and `similarity`, the mean ROUGE-L F1 between base and tuned answers (0..1; Chinese split
into words with jieba), so a style drift is visible even where the facts held.
"""

from __future__ import annotations

import re
from typing import Optional

from .sets import Probe


def phrase_pattern(phrase: str) -> re.Pattern:
    """The phrase as whole words, case-insensitive: where it starts or ends with a Latin letter
    or digit, the answer must not continue it with one ("2" is not found in "240", "Rome" not
    in "Romeo"), except for a plural ending after a letter ("herbivore" in "herbivores").
    Chinese and Japanese text has no spaces, so a CJK edge needs no boundary."""
    phrase, edge = phrase.strip(), "[0-9a-z]"
    left = f"(?<!{edge})" if re.match(edge, phrase[:1], re.IGNORECASE) else ""
    right = ""
    if re.match(edge, phrase[-1:], re.IGNORECASE):
        right = f"(?:e?s)?(?!{edge})" if phrase[-1].isalpha() else f"(?!{edge})"
    return re.compile(left + re.escape(phrase) + right, re.IGNORECASE)


def is_correct(answer: str, expect: list[str] | tuple[str, ...]) -> Optional[bool]:
    """An answer is right when it contains one of the expected phrases as whole words
    (case-insensitive, `phrase_pattern`); None when there is nothing to check against."""
    if not expect:
        return None
    return any(phrase_pattern(e).search(answer) for e in expect)


def retention_report(probes: list[Probe], base_answers: list[str], tuned_answers: list[str], warn_below: float) -> dict:
    """The probe figures and the probes whose answers lost (or gained) the reference."""
    from ..train.evaluate import rouge

    lost, gained = [], []
    base_right = kept = unchanged = 0
    similarity = 0.0
    for probe, before, after in zip(probes, base_answers, tuned_answers, strict=True):
        was, now = is_correct(before, probe.expect), is_correct(after, probe.expect)
        base_right += was
        kept += was and now
        unchanged += before.strip() == after.strip()
        similarity += rouge(after, before)["rouge_l"] / 100.0
        entry = {"question": probe.question, "expect": list(probe.expect), "base": before, "tuned": after}
        if was and not now:
            lost.append(entry)
        elif now and not was:
            gained.append(entry)
    ratio = kept / base_right if base_right else None
    return {
        "probes": len(probes),
        "base_right": base_right,
        "kept": kept,
        "kept_ratio": None if ratio is None else round(ratio, 4),
        "warn_below": warn_below,
        "below_threshold": ratio is not None and ratio < warn_below,
        "unchanged": unchanged,
        "similarity": round(similarity / len(probes), 4) if probes else None,
        "lost": lost,
        "gained": gained,
    }


def describe(report: dict) -> str:
    """One line for logs, Events and tables, e.g. '28 of 30 probes the base model answered right are still right (93%)'."""
    if not report.get("base_right"):
        return f"the base model answered none of the {report.get('probes', 0)} probes right: nothing to keep"
    return (
        f"{report['kept']} of {report['base_right']} probes the base model answered right are still right "
        f"({100 * report['kept_ratio']:.0f}%; {len(report['lost'])} lost, {len(report['gained'])} gained)"
    )

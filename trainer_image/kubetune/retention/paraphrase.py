"""Paraphrase augmentation (spec.retention.paraphrases): the base model rewrites each of the
user's one-turn questions, and every rewrite that keeps the question's names is trained with
the user's own answer, so the tuned model answers the fact however it is asked.

Small instruction models do not rewrite on request: asked "Rewrite this question", a 135M
model answers it. Shown a few rewrites first (a few-shot conversation), it copies the pattern.
Its output is then checked, since a small model also drifts ("What is the name of the lake
beside Velmora?" -> "What is the name of the largest lake in Egypt?"): a rewrite is kept only
when it is one question, differs from the original and from the rewrites kept before, keeps
every name and number of the original and adds none, and has a plausible length.

Generation is greedy, so the rewrites are a function of the model and the questions (cached
with the other base-model answers, retention/phase.py). Pure apart from that.
"""

from __future__ import annotations

import re
from typing import Optional

from ..data.loader import Example

# Few-shot examples: general questions, none about any user's domain. Each instruction
# variant below yields one candidate rewrite per question.
SHOTS = (
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("Who wrote Hamlet?", "Who is the author of Hamlet?"),
    ("How many moons does Mars have?", "What is the number of moons that Mars has?"),
    ("What is the name of the longest river in Egypt?", "Which river in Egypt is the longest?"),
)
INSTRUCTIONS = ("Rewrite this question in other words: ", "Paraphrase: ", "Ask this in a different way: ")

# Variants written per wanted rewrite: about a third of a 135M model's rewrites pass the checks.
VARIANTS_PER_REWRITE = 3


def variants(count: int) -> int:
    """How many rewrites the base model writes per question for `count` kept ones."""
    return min(VARIANTS_PER_REWRITE * count, len(INSTRUCTIONS) * len(SHOTS))


_WORD = re.compile(r"[\w'’-]+", re.UNICODE)


def request(question: str, variant: int) -> list[dict]:
    """The few-shot conversation asking for rewrite number `variant` of `question`."""
    instruction = INSTRUCTIONS[variant % len(INSTRUCTIONS)]
    shots = SHOTS[variant // len(INSTRUCTIONS) % len(SHOTS) :] + SHOTS[: variant // len(INSTRUCTIONS) % len(SHOTS)]
    messages: list[dict] = []
    for asked, rewritten in shots:
        messages += [{"role": "user", "content": instruction + asked}, {"role": "assistant", "content": rewritten}]
    return messages + [{"role": "user", "content": instruction + question}]


def _normal(text: str) -> str:
    return " ".join(w.lower() for w in _WORD.findall(text))


def anchors(question: str) -> set[str]:
    """What a rewrite must keep: names (capitalized words after the first) and numbers,
    possessives folded ("Velmora's" -> "velmora")."""
    words = _WORD.findall(question)
    kept = set()
    for i, word in enumerate(words):
        base = re.sub(r"['’]s?$", "", word)
        if any(ch.isdigit() for ch in base) or (i > 0 and base[:1].isupper()) or (base[:1].isupper() and len(base) > 1 and base[1:].lower() != base[1:]):
            kept.add(base.lower())
    return kept


def accept(question: str, rewrite: str, seen: set[str]) -> Optional[str]:
    """The rewrite, cleaned, if it is a usable paraphrase of `question`; else None."""
    text = rewrite.strip().strip('"“”').strip()
    if not text or "\n" in text or text.count("?") != 1 or not text.endswith("?"):
        return None
    normal = _normal(text)
    if normal == _normal(question) or normal in seen:
        return None
    original, words = len(_WORD.findall(question)), len(_WORD.findall(text))
    if not (0.5 * original <= words <= 2 * original + 2):
        return None
    if anchors(text) != anchors(question):
        return None
    return text


def one_turn(example: Example) -> Optional[tuple[list[dict], str, str]]:
    """(system messages, question, answer) of a one-question example; None for anything else
    (multi-turn conversations are not rewritten)."""
    roles = [m["role"] for m in example.messages]
    system = [m for m in example.messages if m["role"] == "system"]
    if roles[len(system) :] != ["user", "assistant"] or roles[: len(system)] != ["system"] * len(system):
        return None
    user, assistant = example.messages[len(system) :]
    return system, user["content"], assistant["content"]


def select(question: str, rewrites: list[str], count: int) -> list[str]:
    """Up to `count` accepted rewrites of one question, in variant order."""
    chosen: list[str] = []
    seen: set[str] = set()
    for rewrite in rewrites:
        if len(chosen) == count:
            break
        text = accept(question, rewrite, seen)
        if text is not None:
            chosen.append(text)
            seen.add(_normal(text))
    return chosen


def augmented(example: Example, rewrites: list[str]) -> list[Example]:
    """The example asked in each accepted rewrite, with its own answer."""
    system, _, answer = one_turn(example)
    return [Example(system + [{"role": "user", "content": r}, {"role": "assistant", "content": answer}], f"{example.source} (reworded)") for r in rewrites]

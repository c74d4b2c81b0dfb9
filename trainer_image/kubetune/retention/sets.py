"""The prompt sets of spec.retention: replay prompts and probe questions.

KubeTune ships both as package data (`kubetune/retention/prompts/`): `replay.jsonl`, general
instructions and questions in English and Chinese (`{"prompt": ...}` per line), and
`probes.jsonl`, general questions with the phrases a right answer contains
(`{"question": ..., "expect": [...]}`). The two are disjoint: a probe measures what replay
did not train on. `retention.replay.uri` / `retention.probes.uri` replace either with the
user's own JSON Lines (or JSON array) file; a malformed record is refused with file:line.

Pure apart from reading files.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

from ..api.spec import RetentionSpec
from ..data.loader import MAX_REPORTED_ERRORS, DataError, fetch_records, read_records


@dataclass(frozen=True)
class Probe:
    question: str
    expect: tuple[str, ...]  # an answer is right when it contains one of these (case-insensitive)


def _string(record: Any, key: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _prompt(record: Any) -> str:
    return _string(record, "prompt")


def _probe(record: Any) -> Probe:
    question = _string(record, "question")
    expect = record.get("expect")
    if not isinstance(expect, list) or not expect or not all(isinstance(e, str) and e.strip() for e in expect):
        raise ValueError(f"expect: expected a non-empty list of non-empty strings (phrases a right answer contains), got {expect!r}")
    return Probe(question, tuple(expect))


def _parse(records: list[tuple[str, Any]], parse, shown: str, layout: str) -> list:
    items, errors = [], []
    for where, record in records:
        try:
            items.append(parse(record))
        except ValueError as err:
            errors.append(f"{where}: {err}")
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} of {len(records)} records in {shown} are not {layout}:\n" + "\n".join(errors[:MAX_REPORTED_ERRORS]) + more)
    if not items:
        raise DataError(f"{shown} contains no records")
    return items


@dataclass(frozen=True)
class SetFile:
    """One of the two sets: the spec field naming the user's file, the shipped file, the record layout."""

    what: str
    field: str
    shipped: str
    parse: Callable[[Any], Any]
    layout: str

    def load(self, uri: Optional[str], cache_dir: Path, base_dir=None, endpoint=None) -> list:
        """The user's file (every record checked, a bad one refused with file:line), else the shipped set."""
        if uri:
            records, shown = fetch_records(uri, self.what, self.field, cache_dir, base_dir, endpoint)
        else:
            shown = f"kubetune/retention/prompts/{self.shipped}"
            records = read_records(Path(str(resources.files("kubetune.retention") / "prompts" / self.shipped)), shown)
        return _parse(records, self.parse, shown, self.layout)


REPLAY_PROMPTS = SetFile("replay prompts", "spec.retention.replay.uri", "replay.jsonl", _prompt, '{"prompt": "..."}')
PROBES = SetFile("probe questions", "spec.retention.probes.uri", "probes.jsonl", _probe, '{"question": "...", "expect": ["..."]}')
load_replay_prompts = REPLAY_PROMPTS.load
load_probes = PROBES.load


def normalized(text: str) -> str:
    """What makes two prompts the same question: case and whitespace aside."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def replay_candidates(prompts: list[str], probes: list[Probe]) -> list[str]:
    """The prompts that may be replayed: each once, and never a probe question."""
    held_out = {normalized(p.question) for p in probes}
    seen: set[str] = set()
    out = []
    for prompt in prompts:
        key = normalized(prompt)
        if key not in held_out and key not in seen:
            seen.add(key)
            out.append(prompt)
    return out


def replay_count(ratio: float, train_samples: int, available: int) -> int:
    """How many replay samples a job mixes in: ratio x its training samples, at most what the prompts allow."""
    return min(available, round(ratio * train_samples))


def choose_replay(candidates: list[str], count: int, seed: int) -> list[str]:
    """`count` prompts chosen by the seed (the same prompts for the same seed, in a stable order)."""
    return random.Random(f"replay:{seed}").sample(candidates, count)


@dataclass(frozen=True)
class RetentionSets:
    """What one job replays and probes (chosen before any model loads)."""

    replay: list[str]
    probes: list[Probe]
    wanted: int  # replay samples the ratio asked for (more than len(replay) when prompts ran short)
    excluded: int  # replay prompts left out because they are probe questions or repeats


def plan_sets(retention: RetentionSpec, train_samples: int, seed: int, cache_dir: Path, base_dir=None, endpoint=None) -> RetentionSets:
    """Read and check the prompt files, then choose the replay prompts for this job."""
    prompts = load_replay_prompts(retention.replay.uri, cache_dir, base_dir, endpoint)
    probes = load_probes(retention.probes.uri, cache_dir, base_dir, endpoint)
    candidates = replay_candidates(prompts, probes)
    wanted = round(retention.replay.ratio * train_samples)
    chosen = choose_replay(candidates, replay_count(retention.replay.ratio, train_samples, len(candidates)), seed)
    return RetentionSets(chosen, probes, wanted, len(prompts) - len(candidates))

"""Helpers shared by the trainer tests (imported by name: tests/trainer is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def trained_runs(tokenizer, sample) -> list[str]:
    """Decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]

"""Read a dataset file (JSON array or JSON Lines; local, file:// or s3://) into message lists.

Every record is converted when read; the first malformed records stop the run with errors
that name the file, the line (JSON Lines) or the record number (JSON array, 1-based) and
the field. An empty dataset is an error too. All of this happens before any model loads.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..api.spec import DatasetSpec
from ..api.uri import parse_uri
from ..artifacts.storage import fetch
from .converters import Message, RecordError, resolve_columns, to_messages

MAX_REPORTED_ERRORS = 5


class DataError(ValueError):
    """The dataset cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Example:
    messages: list[Message]
    source: str  # "file:LINE" or "file: record N", for later error messages


def read_records(path: Path, shown_name: str) -> list[tuple[str, Any]]:
    """(location, record) pairs. A file starting with '[' is a JSON array, else JSON Lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{shown_name}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as err:
            # Line numbers refer to the stripped text; add back the leading blank lines.
            skipped = text[: len(text) - len(stripped)].count("\n")
            raise DataError(f"{shown_name}:{err.lineno + skipped}: invalid JSON: {err.msg}") from None
        except (ValueError, RecursionError) as err:
            raise DataError(f"{shown_name}: invalid JSON: {_json_limit(err)}") from None
        return [(f"{shown_name}: record {i + 1}", item) for i, item in enumerate(items)]
    records = []
    # JSON Lines end at "\n" only: JSON strings may hold U+2028 and friends raw, which
    # str.splitlines() would also split at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{shown_name}:{number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{shown_name}:{number}: invalid JSON: {err.msg} (column {err.colno})") from None
        except (ValueError, RecursionError) as err:
            raise DataError(f"{shown_name}:{number}: invalid JSON: {_json_limit(err)}") from None
    return records


def _json_limit(err: Exception) -> str:
    """Parser limits hit by hostile files: nesting depth (RecursionError), huge integers (ValueError)."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    if "integer string conversion" in str(err):
        return f"a number has more than {sys.get_int_max_str_digits()} digits; write it as a string"
    return str(err)


def fetch_records(
    uri: str, what: str, field: str, cache_dir: Path, base_dir: Optional[str | Path] = None, endpoint: Optional[str] = None
) -> tuple[list[tuple[str, Any]], str]:
    """Fetch one JSON / JSON Lines file (`what`, named by the spec `field`) and read its
    records; also the name errors show for it (the local path, or the URI)."""
    location = parse_uri(uri, base_dir)
    try:
        path = fetch(location, cache_dir, endpoint=endpoint)
    except FileNotFoundError as err:
        raise DataError(f"{what} {uri}: {err}") from None
    if path.is_dir():
        raise DataError(f"{what} {uri} is a folder; point {field} at one JSON or JSON Lines file")
    shown = str(path) if location.scheme == "file" else str(location)
    return read_records(path, shown), shown


def load_examples(
    uri: str,
    dataset: DatasetSpec,
    cache_dir: Path,
    base_dir: Optional[str | Path] = None,
    endpoint: Optional[str] = None,
    max_samples: Optional[int] = None,
) -> list[Example]:
    """Fetch and convert every record of one dataset file."""
    try:
        cols = resolve_columns(dataset.format, dataset.columns)
    except ValueError as err:
        raise DataError(str(err)) from None
    records, shown = fetch_records(uri, "dataset", "spec.dataset.uri", cache_dir, base_dir, endpoint)
    if max_samples is not None:
        records = records[:max_samples]
    examples, errors = [], []
    for where, record in records:
        try:
            examples.append(Example(to_messages(record, dataset.format, cols), where))
        except RecordError as err:
            errors.append(f"{where}: {err.field}: {err.message}")
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED_ERRORS} more malformed records" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(
            f"{len(errors)} of {len(records)} records in {shown} do not fit format {dataset.format!r}:\n"
            + "\n".join(errors[:MAX_REPORTED_ERRORS])
            + more
        )
    if not examples:
        raise DataError(f"dataset {shown} contains no records")
    return examples


def split_validation(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(ratio * n) examples (at least 1), chosen by the seed; the rest train."""
    held = max(1, round(ratio * len(examples)))
    if held >= len(examples):
        raise DataError(
            f"spec.dataset.validation.ratio {ratio} leaves no training data from {len(examples)} records"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held])
    train = [e for i, e in enumerate(examples) if i not in chosen]
    val = [e for i, e in enumerate(examples) if i in chosen]
    return train, val


def load_datasets(dataset: DatasetSpec, seed: int, cache_dir: Path, base_dir=None, endpoint=None) -> tuple[list[Example], list[Example]]:
    """Training and validation examples as the spec asks (validation may be empty)."""
    train = load_examples(dataset.uri, dataset, cache_dir, base_dir, endpoint, dataset.max_samples)
    val: list[Example] = []
    split = dataset.validation
    if split is not None and split.uri:
        val = load_examples(split.uri, dataset, cache_dir, base_dir, endpoint)
    elif split is not None and split.ratio:
        train, val = split_validation(train, split.ratio, seed)
    if split is not None and split.max_samples is not None:
        val = val[: split.max_samples]
    return train, val

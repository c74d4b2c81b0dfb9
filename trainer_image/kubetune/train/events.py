"""Machine-readable JSON lines on stdout (rank 0), and the small files written next to outputs."""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, Optional

_stream: Optional[IO[str]] = None


def capture_stdout() -> None:
    """Keep the real stdout for events only and send everything else printed (DeepSpeed and
    library logs, C-level output) to stderr, so stdout stays parseable JSON lines."""
    global _stream
    if _stream is not None:
        return
    sys.stdout.flush()
    _stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def emit(event: str, **fields: Any) -> dict:
    record = {"event": event, **fields}
    stream = _stream or sys.stdout
    stream.write(json.dumps(record, default=_plain) + "\n")
    stream.flush()
    return record


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)

"""Machine-readable JSON lines on stdout (rank 0): start, resume, step, eval, checkpoint,
preempted, done.

An EventStream is where they go. `kubetune-train` (main.py) makes its process's one stream
with `EventStream.capture_stdout()` and hands it to the Reporter; a caller in another process
(a test calling `execute`) passes any text stream.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any


class EventStream:
    def __init__(self, stream: IO[str]):
        self.stream = stream

    @classmethod
    def capture_stdout(cls) -> "EventStream":
        """Keep the real stdout for events only and send everything else printed (DeepSpeed and
        library logs, C-level output) to stderr, so stdout stays parseable JSON lines. Once per
        process: it rewires file descriptor 1."""
        sys.stdout.flush()
        stream = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(stream)

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"event": event, **fields}
        self.stream.write(json.dumps(record, default=_plain) + "\n")
        self.stream.flush()
        return record


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)

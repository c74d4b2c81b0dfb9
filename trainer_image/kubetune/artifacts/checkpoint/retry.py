"""Retry storage calls with exponential backoff, so a short storage outage (an S3 endpoint
restarting, a network blip) does not kill a training job that is saving a checkpoint.

boto3 already retries each request a few times within seconds; this covers outages of up
to about a minute. After the last attempt the StorageError propagates and the trainer exits
with exitcodes.STORAGE_ERROR.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ..storage import PreconditionFailed, StorageError

log = logging.getLogger("kubetune.checkpoint")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    first_delay: float = 2.0
    max_delay: float = 30.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """KUBETUNE_STORAGE_ATTEMPTS / KUBETUNE_STORAGE_RETRY_DELAY override the defaults."""
        return cls(
            attempts=int(os.environ.get("KUBETUNE_STORAGE_ATTEMPTS", cls.attempts)),
            first_delay=float(os.environ.get("KUBETUNE_STORAGE_RETRY_DELAY", cls.first_delay)),
        )

    def delays(self) -> list[float]:
        """Sleep before each retry (attempts - 1 of them)."""
        return [min(self.max_delay, self.first_delay * 2**i) for i in range(max(0, self.attempts - 1))]


def with_retry(policy: RetryPolicy, what: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """Call fn; on StorageError (other than a lost conditional write) retry with backoff."""
    delays = policy.delays()
    for attempt, delay in enumerate(delays + [None], start=1):
        try:
            return fn(*args, **kwargs)
        except PreconditionFailed:
            raise
        except StorageError as err:
            if delay is None:
                raise StorageError(f"{what} failed after {attempt} attempts: {err}") from err
            log.warning("%s failed (attempt %d of %d), retrying in %.0f s: %s", what, attempt, len(delays) + 1, delay, err)
            time.sleep(delay)
    raise AssertionError("unreachable")

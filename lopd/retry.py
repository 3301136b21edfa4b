"""One retry policy for every HTTP call the project makes (the training client and the server-backed teachers).

* **What is retried.** A request that got no answer (refused, reset, dropped, timed out:
  `httpx.TransportError`) and an answer of 408, 429 or 5xx: a restarting server, a load
  balancer, a rate limit. Any other answer, 4xx included, goes back to the caller at once: a
  wrong request (or a missing dataset) fails the same way every time.
* **How often.** `retries` retries after the first attempt: at most `retries + 1` attempts.
* **How long between attempts.** A server's `Retry-After` (delta-seconds or an HTTP date) wins,
  capped at `max_retry_after_s`: it knows better than our backoff when it will be ready.
  Otherwise exponential backoff, `backoff_s` before the first retry and doubling, capped at
  `max_backoff_s`, times a uniform jitter factor in [0.5, 1] ("equal jitter"): at least half
  the delay, so retries do spread out, and a random rest, so the ranks or workers that failed
  together do not retry in lockstep.
* **Cancellation.** When the caller's `cancel` event is set (a closed loader or teacher), no
  further attempt starts and a wait in progress ends at once, with `Cancelled`.

The policy knows nothing of the callers' errors: it returns the answer to use, or raises
`RetriesExhausted` carrying the last failure, which each caller turns into its own error.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timezone

import httpx

from lopd.errors import Cancelled, InvalidInput, LopdError

__all__ = ["Failure", "RetriesExhausted", "RetryPolicy", "is_retriable", "retry_after_s"]

log = logging.getLogger(__name__)

_RETRIABLE_4XX = frozenset({408, 429})


def is_retriable(status: int) -> bool:
    """True for the statuses worth another attempt: 408, 429 and 5xx."""
    return status in _RETRIABLE_4XX or status >= 500


def retry_after_s(response: httpx.Response, now: Callable[[], float] = time.time) -> float | None:
    """Seconds an answer's `Retry-After` asks for (delta-seconds or an HTTP date), at least 0.

    None when the header is absent or unreadable (then the backoff applies). Not capped: that is
    the policy's `max_retry_after_s`.
    """
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT by definition
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


@dataclass(frozen=True)
class Failure:
    """One failed attempt: the transport `error` (no answer came back), or the `response` with a retriable status."""

    error: httpx.TransportError | None = None
    response: httpx.Response | None = None

    @property
    def status(self) -> int | None:
        """The HTTP status, or None when no answer came back."""
        return None if self.response is None else self.response.status_code

    def __str__(self) -> str:
        if self.response is not None:
            return f"HTTP {self.response.status_code}"
        return f"{type(self.error).__name__}: {str(self.error) or 'no details'}"


class RetriesExhausted(LopdError):
    """Every attempt failed transiently; `last` is the last failure, `attempts` how many were made."""

    def __init__(self, what: str, attempts: int, last: Failure) -> None:
        super().__init__(f"{what}: {attempts} attempts failed; last failure: {last}")
        self.attempts = attempts
        self.last = last


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is retried after a transient failure (see the module docstring)."""

    retries: int = 5  # after the first attempt: at most retries + 1 attempts in all
    backoff_s: float = 0.5  # the wait before the first retry; doubles with each retry
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 300.0  # the longest wait a server's Retry-After may impose

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise InvalidInput(f"retries is {self.retries}; it must be 0 (no retry) or more")
        if min(self.backoff_s, self.max_backoff_s, self.max_retry_after_s) < 0:
            raise InvalidInput(
                f"backoff_s ({self.backoff_s}), max_backoff_s ({self.max_backoff_s}) and max_retry_after_s "
                f"({self.max_retry_after_s}) must not be negative"
            )

    @property
    def max_attempts(self) -> int:
        """Attempts in all, the first included."""
        return self.retries + 1

    def backoff(self, retry: int) -> float:
        """The wait before retry number `retry` (1 = the first retry) when the server asked for none."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)

    def delay(self, retry: int, failure: Failure) -> float:
        """The wait before retry number `retry`: the failure's `Retry-After` (capped), else the backoff."""
        asked = None if failure.response is None else retry_after_s(failure.response)
        return min(asked, self.max_retry_after_s) if asked is not None else self.backoff(retry)

    def send(
        self,
        attempt: Callable[[], httpx.Response],
        *,
        what: str,
        describe: Callable[[Failure], str] = str,
        cancel: threading.Event | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> httpx.Response:
        """Call `attempt` until it returns an answer that is not retriable; return that answer.

        `what` names the request in logs and errors, `describe` a failure in the retry log.
        Raises `RetriesExhausted` when every attempt failed transiently, and `Cancelled` as soon
        as `cancel` is set (waits then use `cancel.wait` instead of `sleep`).
        """
        for n in range(1, self.max_attempts + 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{what} cancelled")
            try:
                response = attempt()
            except httpx.TransportError as e:  # connect/read/write errors, timeouts, dropped connections
                failure = Failure(error=e)
            else:
                if not is_retriable(response.status_code):
                    return response
                failure = Failure(response=response)
            if cancel is not None and cancel.is_set():  # e.g. the connection was closed under us
                raise Cancelled(f"{what} cancelled")
            if n == self.max_attempts:
                raise RetriesExhausted(what, n, failure)
            wait_s = self.delay(n, failure)
            log.warning("%s failed (%s); retry %d of %d in %.2fs", what, describe(failure), n, self.retries, wait_s)
            if cancel is not None:
                if cancel.wait(wait_s):
                    raise Cancelled(f"{what} cancelled")
            else:
                sleep(wait_s)
        raise AssertionError("unreachable")  # pragma: no cover

"""The one retry policy (`lopd.retry`): attempts, what is retried, Retry-After, jitter, cancellation.

The callers (`StoreClient`, the server-backed teachers' `HTTPClient`) test the same behaviour
end to end; here the policy runs against scripted attempts, with no network.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

from lopd.errors import Cancelled, InvalidInput
from lopd.retry import Failure, RetriesExhausted, RetryPolicy, is_retriable, retry_after_s


class Script:
    """An attempt function that plays `steps` (exceptions to raise, statuses or responses to return), then 200."""

    def __init__(self, *steps: object) -> None:
        self.steps = list(steps)
        self.calls = 0

    def __call__(self) -> httpx.Response:
        self.calls += 1
        step = self.steps.pop(0) if self.steps else 200
        if isinstance(step, Exception):
            raise step
        return step if isinstance(step, httpx.Response) else httpx.Response(int(step))  # type: ignore[call-overload]


def _send(policy: RetryPolicy, script: Script, **kw: object) -> tuple[httpx.Response, list[float]]:
    sleeps: list[float] = []
    return policy.send(script, what="GET http://x/", sleep=sleeps.append, **kw), sleeps  # type: ignore[arg-type]


def _after(value: str, status: int = 503) -> httpx.Response:
    return httpx.Response(status, headers={"Retry-After": value})


def test_retries_count_after_the_first_attempt():
    policy = RetryPolicy(retries=2, backoff_s=0.001)
    assert policy.max_attempts == 3
    resp, sleeps = _send(policy, Script(503, 500))
    assert resp.status_code == 200 and len(sleeps) == 2
    script = Script(*[503] * 10)
    with pytest.raises(RetriesExhausted) as e:
        _send(policy, script)
    assert script.calls == 3 and e.value.attempts == 3 and e.value.last.status == 503
    assert "GET http://x/: 3 attempts failed; last failure: HTTP 503" in str(e.value)
    once = Script(503)
    with pytest.raises(RetriesExhausted):
        _send(RetryPolicy(retries=0), once)
    assert once.calls == 1


def test_transport_errors_are_retried_and_kept_as_the_last_failure():
    script = Script(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError(""))
    with pytest.raises(RetriesExhausted) as e:
        _send(RetryPolicy(retries=2, backoff_s=0.001), script)
    last = e.value.last
    assert last.status is None and last.response is None and isinstance(last.error, httpx.RemoteProtocolError)
    assert str(last) == "RemoteProtocolError: no details"
    resp, _ = _send(RetryPolicy(retries=1, backoff_s=0.001), Script(httpx.ConnectError("refused")))
    assert resp.status_code == 200


@pytest.mark.parametrize("status", range(200, 600))
def test_only_408_429_and_5xx_are_retried(status):
    retriable = status in (408, 429) or status >= 500
    assert is_retriable(status) == retriable
    script = Script(status)
    resp, sleeps = _send(RetryPolicy(retries=1, backoff_s=0.0), script)
    if retriable:
        assert (script.calls, len(sleeps), resp.status_code) == (2, 1, 200)
    else:  # answered as is, at once
        assert (script.calls, sleeps, resp.status_code) == (1, [], status)


def test_backoff_doubles_is_capped_and_jittered_within_half_to_all():
    policy = RetryPolicy(backoff_s=1.0, max_backoff_s=5.0)
    for retry, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)]:
        waits = [policy.backoff(retry) for _ in range(300)]
        assert all(base / 2 <= w <= base for w in waits)
        assert max(waits) - min(waits) > base / 4  # spread out, not in lockstep
    _, sleeps = _send(RetryPolicy(retries=3, backoff_s=1.0, max_backoff_s=100), Script(503, 503, 503))
    for k, s in enumerate(sleeps):
        assert 2**k / 2 <= s <= 2**k


def test_retry_after_seconds_and_dates_are_honoured_and_capped():
    policy = RetryPolicy(retries=4, backoff_s=0.001, max_retry_after_s=60)
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    script = Script(_after("7"), _after(format_datetime(when, usegmt=True), 429), _after("9999"), _after("-3"))
    _, sleeps = _send(policy, script)
    assert sleeps[0] == 7.0 and 25 <= sleeps[1] <= 30 and sleeps[2] == 60 and sleeps[3] == 0.0


def test_retry_after_parsing():
    now = datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp()
    parse = lambda v: retry_after_s(httpx.Response(503, headers={"Retry-After": v}), now=lambda: now)  # noqa: E731
    assert parse(" 12 ") == 12.0 and parse("1.5") == 1.5 and parse("-1") == 0.0
    assert parse("Tue, 01 Jan 2030 00:00:45 GMT") == 45.0
    assert parse("Tue, 01 Jan 2030 00:00:45 -0000") == 45.0  # a date without a zone is GMT
    assert parse("Mon, 31 Dec 2029 23:00:00 GMT") == 0.0  # in the past
    for unreadable in ("soon", "", "inf", "nan"):
        assert parse(unreadable) is None
    assert retry_after_s(httpx.Response(503)) is None


def test_an_unreadable_retry_after_falls_back_to_the_backoff():
    _, sleeps = _send(RetryPolicy(retries=1, backoff_s=2.0), Script(_after("whenever")))
    assert 1.0 <= sleeps[0] <= 2.0


def test_cancel_before_during_and_after_an_attempt():
    stop = threading.Event()
    stop.set()
    script = Script()
    with pytest.raises(Cancelled, match="GET http://x/ cancelled"):
        _send(RetryPolicy(), script, cancel=stop)
    assert script.calls == 0  # nothing sent

    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    script = Script(503, 503)
    start = time.monotonic()
    with pytest.raises(Cancelled):
        _send(RetryPolicy(backoff_s=30.0), script, cancel=stop)  # the 15-30 s wait ends when stop is set
    assert time.monotonic() - start < 5 and script.calls == 1

    stop = threading.Event()

    def failing_while_closed() -> httpx.Response:
        stop.set()
        raise httpx.ReadError("closed under us")

    with pytest.raises(Cancelled):
        RetryPolicy().send(failing_while_closed, what="GET http://x/", cancel=stop)


def test_each_retry_is_logged_with_what_failed(caplog):
    with caplog.at_level(logging.WARNING, logger="lopd.retry"):
        _send(RetryPolicy(retries=2, backoff_s=0.001), Script(503), describe=lambda f: f"{f}: warming up")
    (record,) = caplog.records
    assert "GET http://x/ failed (HTTP 503: warming up); retry 1 of 2 in " in record.getMessage()


def test_invalid_policies_say_what_to_change():
    with pytest.raises(InvalidInput, match="retries is -1; it must be 0"):
        RetryPolicy(retries=-1)
    with pytest.raises(InvalidInput, match="must not be negative"):
        RetryPolicy(backoff_s=-1)


def test_failure_describes_itself():
    assert str(Failure(response=httpx.Response(429))) == "HTTP 429"
    assert str(Failure(error=httpx.ConnectError("refused"))) == "ConnectError: refused"

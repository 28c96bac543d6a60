"""Retry policy, Retry-After, deadlines, circuit breaker and provider errors, without a network."""

from __future__ import annotations

import asyncio
import pickle
import time
from email.utils import formatdate

import pytest

from shared.errors import ServeError, find_serve_error
from shared.providers.config import RetryConfig
from shared.providers.errors import (
    ContentFilteredError,
    DeadlineExceededError,
    ProviderAuthError,
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    ProviderUnsupportedError,
    error_for_status,
    scrub,
)
from shared.providers.reliability import (
    CircuitBreaker,
    Deadline,
    backoff_delay,
    call_with_retries,
    parse_retry_after,
)

pytestmark = pytest.mark.anyio
POLICY = RetryConfig(max_attempts=4, base_backoff_s=0.5, max_backoff_s=4.0)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # the clients run on Ray Serve's asyncio loop


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- backoff and Retry-After ---------------------------------------------------------------------


def test_full_jitter_stays_under_the_capped_exponential() -> None:
    for attempt, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        assert backoff_delay(attempt, POLICY, None, rand=lambda: 0.999999) == pytest.approx(
            cap, rel=1e-5
        )
        assert backoff_delay(attempt, POLICY, None, rand=lambda: 0.0) == 0.0


def test_retry_after_replaces_jitter_and_too_long_a_wait_ends_retries() -> None:
    assert backoff_delay(1, POLICY, 3.0, rand=lambda: 0.0) == 3.0
    assert backoff_delay(1, POLICY, 4.5) is None


def test_parse_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after("-3") == 0.0
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# -- circuit breaker ------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_then_admits_one_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=10, clock=clock)
    for _ in range(3):
        token = breaker.admit()
        assert token is not None
        breaker.record(token, healthy=False)
    assert breaker.state() == "open"
    assert breaker.admit() is None
    assert breaker.retry_in() == pytest.approx(10)

    clock.now += 10
    assert breaker.state() == "half_open"
    probe = breaker.admit()
    assert probe is not None
    assert [breaker.admit() for _ in range(15)] == [None] * 15
    breaker.record(probe, healthy=True)
    assert breaker.state() == "closed"


def test_failed_probe_reopens_and_cancelled_probe_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5, clock=clock)
    breaker.record(breaker.admit() or 0, healthy=False)
    clock.now += 5
    probe = breaker.admit()
    assert probe is not None
    breaker.release(probe)
    second = breaker.admit()
    assert second is not None, "a cancelled probe must not leave the circuit stuck half-open"
    breaker.record(second, healthy=False)
    assert breaker.state() == "open"
    assert breaker.retry_in() == pytest.approx(5)


def test_success_resets_consecutive_failures_and_stale_outcomes_are_ignored() -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=5, clock=FakeClock())
    early = breaker.admit()
    breaker.record(breaker.admit() or 0, healthy=False)
    breaker.record(breaker.admit() or 0, healthy=True)
    breaker.record(breaker.admit() or 0, healthy=False)
    assert breaker.state() == "closed"
    breaker.record(breaker.admit() or 0, healthy=False)
    assert breaker.state() == "open"
    assert early is not None
    breaker.record(early, healthy=True)  # admitted before the circuit opened: no say now
    assert breaker.state() == "open"


# -- call_with_retries ----------------------------------------------------------------------------


class Script:
    """An attempt that raises the scripted errors in order, then returns "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.sleeps: list[float] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


async def run(script: Script, deadline: Deadline | None = None, **policy: float) -> str:
    return await call_with_retries(
        script,
        provider="p",
        policy=POLICY.model_copy(update=policy),
        breaker=CircuitBreaker(5, 30),
        deadline=deadline or Deadline(None),
        sleep=script.sleep,
        rand=lambda: 0.5,
    )


async def test_retryable_failures_are_retried_until_success() -> None:
    script = Script(ProviderUnavailableError("503"), ProviderTimeoutError("408"))
    assert await run(script) == "ok"
    assert script.calls == 3
    assert script.sleeps == [0.25, 0.5]  # half of the 0.5 s and 1 s caps (rand is 0.5)


@pytest.mark.parametrize(
    "error",
    [ProviderRejectedError("400"), ProviderAuthError("401"), ProviderUnsupportedError("404")],
)
async def test_non_retryable_failures_are_raised_after_one_attempt(error: Exception) -> None:
    script = Script(error)
    with pytest.raises(type(error)):
        await run(script)
    assert script.calls == 1


async def test_attempts_are_capped() -> None:
    script = Script(*[ProviderUnavailableError("503")] * 10)
    with pytest.raises(ProviderUnavailableError):
        await run(script, max_attempts=3)
    assert script.calls == 3


async def test_a_wait_past_the_deadline_raises_the_original_error_at_once() -> None:
    script = Script(ProviderRateLimitedError("429", retry_after=3.0))
    started = time.monotonic()
    with pytest.raises(ProviderRateLimitedError, match="429"):
        await run(script, deadline=Deadline.start(time.time() + 1.0, None))
    assert script.calls == 1
    assert time.monotonic() - started < 0.5


async def test_an_attempt_running_past_the_deadline_is_a_deadline_error() -> None:
    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    breaker = CircuitBreaker(1, 30)
    with pytest.raises(DeadlineExceededError) as caught:
        await call_with_retries(
            slow,
            provider="p",
            policy=POLICY,
            breaker=breaker,
            deadline=Deadline.start(time.time() + 0.05, None),
        )
    assert caught.value.code == "provider_timeout" and caught.value.status == 504
    assert breaker.state() == "closed", "the caller's deadline says nothing about the provider"


def test_deadline_takes_the_earlier_of_wall_deadline_and_budget() -> None:
    deadline = Deadline.start(time.time() + 100, budget_s=2)
    assert deadline.remaining() == pytest.approx(2, abs=0.1)
    assert Deadline.start(None, None).remaining() is None
    assert not Deadline.start(time.time() + 1, None).allows(2)


# -- errors ---------------------------------------------------------------------------------------


def test_status_mapping() -> None:
    assert error_for_status(401) is ProviderAuthError
    assert error_for_status(403) is ProviderAuthError
    assert error_for_status(404) is ProviderUnsupportedError
    assert error_for_status(408) is ProviderTimeoutError
    assert error_for_status(429) is ProviderRateLimitedError
    assert error_for_status(400) is ProviderRejectedError
    assert error_for_status(503) is ProviderUnavailableError


def test_provider_errors_pickle_with_their_reliability_facts() -> None:
    error = ProviderRateLimitedError("slow down", param="n", retry_after=2.5)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ProviderRateLimitedError
    assert (copy.status, copy.code, copy.param, copy.retry_after) == (429, error.code, "n", 2.5)
    assert copy.retryable and isinstance(copy, ServeError)
    wrapped = RuntimeError("ray wrapper")
    wrapped.__cause__ = ContentFilteredError("blocked")
    found = find_serve_error(wrapped)
    assert found is not None and found.to_dict()["code"] == "content_filtered"
    assert found.status == 422


def test_scrub_removes_keys_and_bounds_length() -> None:
    text = scrub(
        "bad key sk-abc123***wxyz and my-secret-value here " + "x" * 600, "my-secret-value"
    )
    assert "sk-abc" not in text and "my-secret-value" not in text
    assert len(text) <= 501

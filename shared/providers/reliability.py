"""Retries, deadlines and the circuit breaker that every provider client shares.

- `Deadline`: one call's time budget. Callers pass a wall-clock deadline (`time.time()` based, so
  it means the same thing after a hop to another Ray node); it is turned into a monotonic one once.
- `CircuitBreaker`: closed → open after `failure_threshold` consecutive provider faults → after
  `reset_timeout_s`, half-open admits exactly one probe; its success closes the circuit, its
  failure reopens it. Everyone else fails fast meanwhile.
- `call_with_retries`: runs one attempt at a time through the breaker and the deadline, retrying
  only `ProviderError`s marked retryable, with capped exponential backoff and full jitter, or the
  provider's `Retry-After` when it gave one. A wait that would cross the deadline is not started:
  the caller gets the original error at once instead of a timeout later.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from shared.providers.config import BreakerConfig, RetryConfig
from shared.providers.errors import (
    DeadlineExceededError,
    ProviderError,
    ProviderUnavailableError,
)

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]


class Deadline:
    """A monotonic point in time by which a call must be done (or none)."""

    def __init__(self, at: float | None) -> None:
        self.at = at

    @classmethod
    def start(cls, wall_deadline: float | None, budget_s: float | None) -> Deadline:
        """The earlier of a wall-clock deadline and `budget_s` from now."""
        now = time.monotonic()
        candidates = []
        if wall_deadline is not None:
            candidates.append(now + (wall_deadline - time.time()))
        if budget_s is not None:
            candidates.append(now + budget_s)
        return cls(min(candidates) if candidates else None)

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def allows(self, seconds: float) -> bool:
        """Whether waiting `seconds` still leaves time for the next attempt."""
        remaining = self.remaining()
        return remaining is None or seconds < remaining

    async def run(self, start: Callable[[], Awaitable[T]], what: str) -> T:
        """Await `start()`; the deadline passing raises `DeadlineExceededError`."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError(f"{what}: the request deadline passed before it started")
        try:
            return await asyncio.wait_for(start(), remaining)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(
                f"{what}: the request deadline passed while waiting for the provider"
            ) from None


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open probe.

    Admission returns a token (the breaker's generation) so that an outcome reported by a call
    admitted under an older state cannot close or reopen the circuit by mistake. A lock makes it
    safe from threads too, although the clients only use it from one event loop.
    """

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._generation = 0
        self._probe_in_flight = False

    @classmethod
    def from_config(cls, config: BreakerConfig) -> CircuitBreaker:
        return cls(config.failure_threshold, config.reset_timeout_s)

    def state(self) -> BreakerState:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def retry_in(self) -> float:
        """Seconds until an open circuit admits its probe (0 unless open)."""
        with self._lock:
            if self._state != "open":
                return 0.0
            return max(0.0, self._opened_at + self._reset_timeout_s - self._clock())

    def admit(self) -> int | None:
        """A token for a call allowed through, or None when the call must fail fast."""
        with self._lock:
            self._maybe_half_open()
            if self._state == "closed":
                return self._generation
            if self._state == "half_open" and not self._probe_in_flight:
                self._probe_in_flight = True
                return self._generation
            return None

    def record(self, token: int, healthy: bool) -> None:
        """The outcome of an admitted call: `healthy` unless it was a provider fault."""
        with self._lock:
            if token != self._generation:
                return
            if self._state == "half_open":
                self._probe_in_flight = False
                self._transition("closed" if healthy else "open")
            elif healthy:
                self._failures = 0
            else:
                self._count_failure()

    def release(self, token: int) -> None:
        """An admitted call ended without a verdict (cancelled): free the probe slot."""
        with self._lock:
            if token == self._generation and self._state == "half_open":
                self._probe_in_flight = False

    def note_failure(self) -> None:
        """A provider fault seen outside an admitted attempt (e.g. a stream dying mid-way)."""
        with self._lock:
            if self._state == "closed":
                self._count_failure()

    def _count_failure(self) -> None:
        self._failures += 1
        if self._failures >= self._threshold:
            self._transition("open")

    def _maybe_half_open(self) -> None:
        if self._state == "open" and self._clock() >= self._opened_at + self._reset_timeout_s:
            self._transition("half_open")

    def _transition(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._failures = 0
        self._probe_in_flight = False
        if state == "open":
            self._opened_at = self._clock()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds or an HTTP date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds)


def backoff_delay(
    failed_attempt: int,
    policy: RetryConfig,
    retry_after: float | None,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """Wait before the next attempt, or None when the provider asked for longer than we allow.

    Full jitter (a uniform draw below the capped exponential) spreads the retries of many callers
    that failed together; a provider's Retry-After replaces it because it knows better.
    """
    if retry_after is not None:
        return retry_after if retry_after <= policy.max_backoff_s else None
    cap = min(policy.max_backoff_s, policy.base_backoff_s * 2 ** (failed_attempt - 1))
    return rand() * cap


def circuit_open_error(provider: str, breaker: CircuitBreaker) -> ProviderUnavailableError:
    retry_in = breaker.retry_in()
    return ProviderUnavailableError(
        f"provider {provider} is failing; its circuit is open and the next probe is allowed in "
        f"{retry_in:.1f} s",
        retry_after=retry_in,
        retryable=False,
    )


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    provider: str,
    policy: RetryConfig,
    breaker: CircuitBreaker,
    deadline: Deadline,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> T:
    """Run `attempt` until it succeeds, fails for good, runs out of attempts or of time."""
    last: ProviderError | None = None
    number = 0
    while True:
        number += 1
        token = breaker.admit()
        if token is None:
            # Once our own failures opened the circuit, the first error says more than "open".
            raise last or circuit_open_error(provider, breaker)
        try:
            result = await deadline.run(attempt, f"provider {provider}")
        except DeadlineExceededError:
            # The caller ran out of time: no verdict on the provider's health.
            breaker.release(token)
            raise
        except ProviderError as exc:
            breaker.record(token, healthy=not exc.provider_fault)
            last = exc
        except BaseException:
            breaker.release(token)
            raise
        else:
            breaker.record(token, healthy=True)
            return result
        if not last.retryable or number >= policy.max_attempts:
            raise last
        delay = backoff_delay(number, policy, last.retry_after, rand)
        if delay is None or not deadline.allows(delay):
            raise last
        await sleep(delay)

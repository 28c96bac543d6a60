"""Provider clients wired to fakes for tests: fast retry settings, loopback-only, scoped key.

The key and `DIFFUSION_SERVE_LOOPBACK_ONLY=1` are put in the environment only while the client is
built (clients read both once, at construction), so no test leaks them into another.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from pydantic import TypeAdapter

from shared.providers import (
    LOOPBACK_ONLY_ENV,
    ProviderClient,
    ProviderConfig,
    ProviderConfigBase,
    build_client,
)
from tests.fakes.server import FakeProvider

# Short waits so retry tests take milliseconds; tests that measure Retry-After raise the cap.
FAST = {
    "timeouts": {"connect_s": 1.0, "read_s": 5.0, "total_s": 10.0},
    "retries": {"max_attempts": 3, "base_backoff_s": 0.01, "max_backoff_s": 2.0},
    "breaker": {"failure_threshold": 5, "reset_timeout_s": 30.0},
}
KEEP = object()
PROVIDER_CONFIG: TypeAdapter[ProviderConfig] = TypeAdapter(ProviderConfig)


def provider_config(fake: FakeProvider, **overrides: Any) -> ProviderConfigBase:
    """The fake's config with FAST settings; dict overrides merge into nested blocks."""
    data: dict[str, Any] = fake.config() | {key: dict(value) for key, value in FAST.items()}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = data[key] | value
        else:
            data[key] = value
    return PROVIDER_CONFIG.validate_python(data)


@contextmanager
def scoped_env(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the duration of the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set(name, value)


def make_client(fake: FakeProvider, api_key: Any = KEEP, **overrides: Any) -> ProviderClient:
    """A client for `fake`; `api_key` replaces the fake's key (None: the variable is unset)."""
    key = fake.api_key if api_key is KEEP else api_key
    config = provider_config(fake, **overrides)
    with scoped_env({config.key_env: key, LOOPBACK_ONLY_ENV: "1"}):
        return build_client(config)


@asynccontextmanager
async def fake_client(
    fake: FakeProvider, api_key: Any = KEEP, **overrides: Any
) -> AsyncIterator[ProviderClient]:
    client = make_client(fake, api_key, **overrides)
    try:
        yield client
    finally:
        await client.aclose()


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value

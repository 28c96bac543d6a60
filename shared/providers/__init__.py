"""Cloud image providers: one Ray-free async client per provider protocol, built from config.

`build_client(config)` returns a `ProviderClient` (see `base.py`) for `config.kind`:

- `openai`   — OpenAI Images API, streaming partial images as step events (`openai_images.py`)
- `runware`  — Runware task array `imageInference` (`runware.py`)
- `gemini`   — Gemini `generateContent` with image output (`gemini.py`)
- `parasail` — OpenAI-compatible, image capability probed first (`parasail.py`)

Every client shares timeouts, retries with backoff and `Retry-After`, deadlines and a circuit
breaker (`reliability.py`), and raises the `ProviderError`s of `errors.py`. Clients refuse
non-loopback hosts when `allow_remote` is false or `DIFFUSION_SERVE_LOOPBACK_ONLY=1` is set
(`guard.py`).
"""

from __future__ import annotations

import httpx

from shared.providers.base import BaseProviderClient, ProviderClient
from shared.providers.config import ProviderConfig
from shared.providers.errors import (
    ContentFilteredError,
    DeadlineExceededError,
    ProviderAuthError,
    ProviderBadResponseError,
    ProviderConfigError,
    ProviderError,
    ProviderQuotaError,
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    ProviderUnsupportedError,
)
from shared.providers.gemini import GeminiClient
from shared.providers.guard import LOOPBACK_ONLY_ENV
from shared.providers.openai_images import OpenAIImagesClient
from shared.providers.parasail import ParasailClient
from shared.providers.runware import RunwareClient

CLIENTS: dict[str, type[BaseProviderClient]] = {
    "openai": OpenAIImagesClient,
    "runware": RunwareClient,
    "gemini": GeminiClient,
    "parasail": ParasailClient,
}


def build_client(
    config: ProviderConfig, transport: httpx.AsyncBaseTransport | None = None
) -> ProviderClient:
    """The client for `config.kind`; `transport` replaces the network (tests, proxies)."""
    return CLIENTS[config.kind](config, transport)


__all__ = [
    "CLIENTS",
    "LOOPBACK_ONLY_ENV",
    "ContentFilteredError",
    "DeadlineExceededError",
    "ProviderAuthError",
    "ProviderBadResponseError",
    "ProviderClient",
    "ProviderConfig",
    "ProviderConfigError",
    "ProviderError",
    "ProviderQuotaError",
    "ProviderRateLimitedError",
    "ProviderRejectedError",
    "ProviderTimeoutError",
    "ProviderUnavailableError",
    "ProviderUnsupportedError",
    "build_client",
]

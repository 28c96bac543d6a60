"""Cloud image providers: one Ray-free async client per provider protocol, built from config.

Each kind's module owns its config class and its client; `ProviderConfig` is the union of the
config classes, discriminated on `kind`, and `build_client(config)` returns the `ProviderClient`
(see `base.py`) whose `config_class` the config is:

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

from typing import Annotated

import httpx
from pydantic import Field

from shared.providers.base import BaseProviderClient, ProviderClient
from shared.providers.config import ProviderConfigBase
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
from shared.providers.gemini import GeminiClient, GeminiProviderConfig
from shared.providers.guard import LOOPBACK_ONLY_ENV
from shared.providers.openai_images import OpenAIImagesClient, OpenAIProviderConfig
from shared.providers.parasail import ParasailClient, ParasailProviderConfig
from shared.providers.runware import RunwareClient, RunwareProviderConfig

ProviderConfig = Annotated[
    OpenAIProviderConfig | RunwareProviderConfig | GeminiProviderConfig | ParasailProviderConfig,
    Field(discriminator="kind"),
]
# Keyed by each client's own config class, so a kind's name is written once, in its config.
CLIENTS: dict[type[ProviderConfigBase], type[BaseProviderClient]] = {
    client.config_class: client
    for client in (OpenAIImagesClient, RunwareClient, GeminiClient, ParasailClient)
}


def build_client(
    config: ProviderConfigBase, transport: httpx.AsyncBaseTransport | None = None
) -> ProviderClient:
    """The client for `config`'s kind; `transport` replaces the network (tests, proxies)."""
    return CLIENTS[type(config)](config, transport)


__all__ = [
    "CLIENTS",
    "LOOPBACK_ONLY_ENV",
    "ContentFilteredError",
    "DeadlineExceededError",
    "ProviderAuthError",
    "ProviderBadResponseError",
    "ProviderClient",
    "ProviderConfig",
    "ProviderConfigBase",
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

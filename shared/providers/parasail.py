"""Parasail client: the OpenAI Images protocol on Parasail's OpenAI-compatible base URL.

Parasail does not offer image generation to every account, so before the first paid request the
client asks `GET /v1/models` what this key can use (cached for `probe_ttl_s`). A model that is not
listed, or whose image endpoint answered 404, is reported "unsupported" by `probe()` and refused
with `provider_unsupported` without another request, instead of failing in some provider-specific
way at request time. When the list cannot be fetched the request goes ahead and the answer decides.
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import httpx
from pydantic import Field

from shared.api.schemas import GeneratedImage, GenerateRequest
from shared.providers.config import ProviderConfigBase
from shared.providers.errors import ProviderError, ProviderUnsupportedError
from shared.providers.openai_images import OpenAICompatibleClient, OpenAIOptions
from shared.providers.reliability import Deadline


class ParasailOptions(OpenAIOptions):
    """Parasail speaks the OpenAI protocol; image generation is probed before it is used."""

    streaming_model_prefixes: list[str] = Field(
        default_factory=list, description="Models that stream partial images (none known)."
    )
    legacy_model_prefixes: list[str] = Field(
        default_factory=list, description="Models that take `response_format`."
    )
    probe_ttl_s: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="How long a /v1/models capability answer is trusted.",
    )


class ParasailProviderConfig(ProviderConfigBase):
    """A provider on Parasail's OpenAI-compatible API."""

    DEFAULT_BASE_URL: ClassVar[str] = "https://api.parasail.io"
    DEFAULT_API_KEY_ENV: ClassVar[str] = "PARASAIL_API_KEY"

    kind: Literal["parasail"] = Field(description="Protocol: OpenAI Images on Parasail.")
    parasail: ParasailOptions = Field(
        default_factory=ParasailOptions, description="Parasail options; defaults if unset."
    )


class ParasailClient(OpenAICompatibleClient):
    config_class = ParasailProviderConfig

    def __init__(
        self, config: ParasailProviderConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        super().__init__(config, config.parasail, transport)
        self._probe_ttl_s = config.parasail.probe_ttl_s
        self._listed: set[str] | None = None
        self._listed_at = 0.0
        self._unsupported: dict[str, tuple[str, float]] = {}

    async def _preflight(self, request: GenerateRequest, budget: Deadline) -> None:
        reason = self._known_unsupported(request.model)
        if reason is None and self.breaker_state() == "closed":
            # While the circuit is not closed the list would fail too; let the breaker answer.
            listed = await self._fresh_listing(budget)
            if listed is not None and request.model not in listed:
                reason = "it is not in this account's /v1/models list"
        if reason is not None:
            raise ProviderUnsupportedError(
                f"provider {self.name} cannot generate images with {request.model!r}: {reason}",
                param="model",
            )

    async def _generate_images(
        self, request: GenerateRequest, request_id: str, budget: Deadline
    ) -> list[GeneratedImage]:
        try:
            return await super()._generate_images(request, request_id, budget)
        except ProviderUnsupportedError as exc:
            # A 404 from the images route: remember it so later requests fail fast and free.
            reason = f"its image endpoint answered: {exc.message}"
            self._unsupported[request.model] = (reason, time.monotonic())
            raise

    async def _probe_models(self, budget: Deadline) -> dict[str, str]:
        self._listed = await self._listed_models(budget)
        self._listed_at = time.monotonic()
        return {model: self._model_state(model) for model in self.config.models}

    def _model_state(self, model: str) -> str:
        listed = self._listed is None or model in self._listed
        return "available" if listed and self._known_unsupported(model) is None else "unsupported"

    def _known_unsupported(self, model: str) -> str | None:
        """Why `model` failed recently, forgotten after probe_ttl_s (accounts gain access)."""
        reason, at = self._unsupported.get(model, (None, 0.0))
        if reason is not None and time.monotonic() - at < self._probe_ttl_s:
            return reason
        return None

    async def _fresh_listing(self, budget: Deadline) -> set[str] | None:
        age = time.monotonic() - self._listed_at
        if self._listed is not None and age < self._probe_ttl_s:
            return self._listed
        try:
            await self._probe_models(budget)
        except ProviderError:
            return None
        return self._listed

"""What every cloud provider's configuration shares (`providers:` entries of the app args).

A provider's config class lives in its kind's module (`OpenAIProviderConfig` in
`openai_images.py`, ...) and extends `ProviderConfigBase` here with its `kind` and its options
block (`openai:`, `runware:`, `gemini:`, `parasail:`), whose defaults apply when it is left out.
`shared.providers.ProviderConfig` is the union of them, discriminated on `kind`; annotate with
`ProviderConfigBase` where any provider's config will do.

Every model forbids unknown keys, so a typo, or another kind's options block, fails at deploy
time with the field's name.
"""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    """Refuses unknown keys; the base of every model here and of the kinds' options blocks."""

    model_config = ConfigDict(extra="forbid")


class TimeoutsConfig(StrictModel):
    """How long one call may take; `total_s` bounds every attempt and backoff together."""

    connect_s: float = Field(default=5.0, gt=0, le=300, description="TCP/TLS connect timeout.")
    read_s: float = Field(
        default=120.0, gt=0, le=3600, description="Longest silence while reading an answer."
    )
    total_s: float = Field(
        default=180.0,
        gt=0,
        le=7200,
        description="Budget of one generate/stream call, retries and backoff included; a "
        "request's own deadline shortens it.",
    )


class RetryConfig(StrictModel):
    """Retries of retryable failures (connection errors, 408, 429, 5xx) only."""

    max_attempts: int = Field(
        default=3, ge=1, le=10, description="Attempts per call, the first included."
    )
    base_backoff_s: float = Field(
        default=0.5, ge=0, le=60, description="Backoff cap of the first retry; doubles per retry."
    )
    max_backoff_s: float = Field(
        default=20.0,
        ge=0,
        le=600,
        description="Largest backoff; a Retry-After longer than this ends the retries.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> RetryConfig:
        if self.base_backoff_s > self.max_backoff_s:
            raise ValueError(
                f"base_backoff_s ({self.base_backoff_s}) exceeds max_backoff_s "
                f"({self.max_backoff_s})"
            )
        return self


class BreakerConfig(StrictModel):
    """Per-provider circuit breaker: open after consecutive provider faults, probe after a pause."""

    failure_threshold: int = Field(
        default=5, ge=1, le=1000, description="Consecutive provider faults that open the circuit."
    )
    reset_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Time open before one half-open probe is admitted."
    )


class ProviderConfigBase(StrictModel):
    """One cloud provider: where it is, how to authenticate, what it serves, how to be patient.

    Each kind's subclass narrows `kind` to its name and sets its public endpoint and usual key
    variable as `DEFAULT_BASE_URL` and `DEFAULT_API_KEY_ENV`.
    """

    DEFAULT_BASE_URL: ClassVar[str]
    DEFAULT_API_KEY_ENV: ClassVar[str]

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="Provider name: the `provider/` prefix of model ids and the result backend.",
    )
    kind: str = Field(description="Protocol the provider speaks.")
    base_url: str | None = Field(
        default=None,
        max_length=2000,
        description="Scheme and host (no `/v1`); the kind's public endpoint if unset.",
    )
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=128,
        description="Environment variable holding the API key (the key itself never goes in "
        "config); the kind's usual variable if unset.",
    )
    models: list[str] = Field(
        min_length=1, description="Provider model names this provider serves."
    )
    allow_remote: bool = Field(
        default=True,
        description="Allow a non-loopback base_url; false (or DIFFUSION_SERVE_LOOPBACK_ONLY=1 in "
        "the environment) keeps the client on 127.0.0.1/::1/localhost.",
    )
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="Largest answer body (base64 images included) or downloaded image accepted.",
    )
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig, description="Timeouts.")
    retries: RetryConfig = Field(default_factory=RetryConfig, description="Retry policy.")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig, description="Circuit breaker.")

    @field_validator("base_url")
    @classmethod
    def _plain_origin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL with a host; got {value!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("base_url must not carry credentials, a query or a fragment")
        path = parts.path.rstrip("/")
        if path.endswith(("/v1", "/v1beta")):
            # The clients append the versioned paths themselves (`{base}/v1/images/...`).
            raise ValueError(f"base_url must not end in the API version ({path!r}); drop it")
        return value.rstrip("/")

    @property
    def url(self) -> str:
        """The base URL in effect."""
        return self.base_url or self.DEFAULT_BASE_URL

    @property
    def key_env(self) -> str:
        """The environment variable that holds the API key."""
        return self.api_key_env or self.DEFAULT_API_KEY_ENV

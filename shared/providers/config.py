"""Configuration of one cloud image provider (`providers:` entries of the app args).

`ProviderConfig` forbids unknown keys like every config model, so a typo fails at deploy time with
the field's name. Options that only make sense for one protocol live in a per-kind block
(`openai:`, `runware:`, `gemini:`, `parasail:`); only the block matching `kind` may be set, and
the client uses that block's defaults when it is left out.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ProviderKind = Literal["openai", "runware", "gemini", "parasail"]

DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com",
    "runware": "https://api.runware.ai",
    "gemini": "https://generativelanguage.googleapis.com",
    "parasail": "https://api.parasail.io",
}
DEFAULT_API_KEY_ENVS: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "runware": "RUNWARE_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "parasail": "PARASAIL_API_KEY",
}
Modality = Literal["TEXT", "IMAGE"]
DEFAULT_MODALITIES: list[Modality] = ["IMAGE"]
GEMINI_ASPECT_RATIOS = ["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TimeoutsConfig(_Strict):
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


class RetryConfig(_Strict):
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


class BreakerConfig(_Strict):
    """Per-provider circuit breaker: open after consecutive provider faults, probe after a pause."""

    failure_threshold: int = Field(
        default=5, ge=1, le=1000, description="Consecutive provider faults that open the circuit."
    )
    reset_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Time open before one half-open probe is admitted."
    )


class OpenAIOptions(_Strict):
    """OpenAI Images API options (`POST /v1/images/generations`)."""

    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        default=None, description="`quality` sent with every request; provider default if unset."
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        default=None, description="`background` for GPT image models; provider default if unset."
    )
    moderation: Literal["low", "auto"] | None = Field(
        default=None,
        description="`moderation` level for GPT image models; provider default if unset.",
    )
    user: str | None = Field(
        default=None, max_length=256, description="Stable end-user/deployment id sent as `user`."
    )
    partial_images: int = Field(
        default=2, ge=0, le=3, description="Partial images requested when streaming with previews."
    )
    streaming_model_prefixes: list[str] = Field(
        default_factory=lambda: ["gpt-image", "chatgpt-image"],
        description="Models (by name prefix) that accept `stream: true` + `partial_images`.",
    )
    legacy_model_prefixes: list[str] = Field(
        default_factory=lambda: ["dall-e"],
        description="Models (by name prefix) that take `response_format` instead of "
        "`output_format`/`background`/`moderation`.",
    )
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="`response_format` for legacy models; URLs are downloaded."
    )


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


class RunwareOptions(_Strict):
    """Runware `imageInference` task options."""

    output_type: Literal["base64Data", "dataURI", "URL"] = Field(
        default="base64Data", description="`outputType`; URLs are downloaded with the same client."
    )
    check_nsfw: bool = Field(
        default=True, description="Send `checkNSFW`; a flagged image answers `content_filtered`."
    )
    default_width: int = Field(
        default=1024,
        ge=128,
        le=2048,
        multiple_of=64,
        description="`width` when a request omits it.",
    )
    default_height: int = Field(
        default=1024,
        ge=128,
        le=2048,
        multiple_of=64,
        description="`height` when a request omits it.",
    )


class GeminiOptions(_Strict):
    """Gemini `generateContent` options for image-output models."""

    response_modalities: list[Modality] = Field(
        default_factory=lambda: list(DEFAULT_MODALITIES),
        min_length=1,
        description="`generationConfig.responseModalities`; must include IMAGE.",
    )
    aspect_ratios: list[str] = Field(
        default_factory=lambda: list(GEMINI_ASPECT_RATIOS),
        min_length=1,
        description="Aspect ratios the models accept; width:height must reduce to one of them.",
    )

    @field_validator("response_modalities")
    @classmethod
    def _wants_images(cls, value: list[str]) -> list[str]:
        if "IMAGE" not in value:
            raise ValueError(f"response_modalities must include IMAGE; got {value}")
        return value


class ProviderConfig(_Strict):
    """One cloud provider: where it is, how to authenticate, what it serves, how to be patient."""

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="Provider name: the `provider/` prefix of model ids and the result backend.",
    )
    kind: ProviderKind = Field(description="Protocol the provider speaks.")
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
    openai: OpenAIOptions | None = Field(default=None, description="Options when kind is openai.")
    runware: RunwareOptions | None = Field(
        default=None, description="Options when kind is runware."
    )
    gemini: GeminiOptions | None = Field(default=None, description="Options when kind is gemini.")
    parasail: ParasailOptions | None = Field(
        default=None, description="Options when kind is parasail."
    )

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

    @model_validator(mode="after")
    def _options_match_kind(self) -> ProviderConfig:
        blocks: dict[str, BaseModel | None] = {
            "openai": self.openai,
            "runware": self.runware,
            "gemini": self.gemini,
            "parasail": self.parasail,
        }
        stray = [kind for kind, block in blocks.items() if block is not None and kind != self.kind]
        if stray:
            raise ValueError(
                f"provider {self.name!r} is kind {self.kind!r} but sets options for {stray}; "
                f"only `{self.kind}:` options apply"
            )
        return self

    @property
    def url(self) -> str:
        """The base URL in effect."""
        return self.base_url or DEFAULT_BASE_URLS[self.kind]

    @property
    def key_env(self) -> str:
        """The environment variable that holds the API key."""
        return self.api_key_env or DEFAULT_API_KEY_ENVS[self.kind]

"""Application arguments (`args:` in serve_config.yaml), validated once at deploy time.

Every model forbids unknown keys, so a typo fails `serve run` with the field's name. Every field
has a description and bounds; limits here are what the Router enforces at the edge.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from shared.config.base import StrictConfig
from shared.config.deployment import DeploymentOptions
from shared.config.models import LimitsConfig, ModelConfig
from shared.providers import ProviderConfig


class EncoderConfig(StrictConfig):
    batch_max_size: int = Field(8, ge=1, le=256, description="Most prompts per encoder batch.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, le=1, description="How long a batch waits to fill."
    )
    cache_entries: int = Field(
        1024, ge=0, le=1_000_000, description="Most entries in the embedding LRU."
    )
    cache_bytes: int = Field(
        256 * 2**20,
        ge=0,
        le=64 * 2**30,
        description="Most bytes the embedding LRU holds (an SDXL prompt's embeddings are about "
        "1.3 MB); exported as `encoder_cache_bytes`.",
    )


class BatchingConfig(StrictConfig):
    """SDXLPipeline's step batcher: one UNet call per step for every compatible request."""

    enabled: bool = Field(
        True,
        description="Batch denoising steps across the requests on a replica; off runs one "
        "request at a time.",
    )
    max_batch_images: int = Field(
        8, ge=1, le=512, description="Most images in one UNet call (CFG doubles its rows)."
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="How long an idle replica waits for more requests before its first step; "
        "0: requests join at the next step boundary.",
    )


class EngineConfig(StrictConfig):
    """Fast paths of SDXLPipeline's UNet. Unset means on with CUDA, off on the CPU (where
    neither helps and fusing would copy weights that are otherwise zero-copy views)."""

    channels_last: bool | None = Field(
        None, description="Keep the UNet's weights and activations in channels-last layout."
    )
    fuse_qkv: bool | None = Field(
        None, description="Fuse each attention's query/key/value projections into one matmul."
    )

    def resolved(self, device: str) -> dict[str, bool]:
        cuda = device.startswith("cuda")
        return {
            "channels_last": cuda if self.channels_last is None else self.channels_last,
            "fuse_qkv": cuda if self.fuse_qkv is None else self.fuse_qkv,
        }


class OpenAIImagesConfig(StrictConfig):
    """`POST /v1/images/generations`: how OpenAI's `quality` maps onto denoising steps."""

    quality_steps: dict[str, int] = Field(
        default_factory=lambda: {"low": 15, "medium": 25, "high": 40},
        description="Steps per `quality` (low, medium, high, standard, hd); other qualities "
        "take `default_steps`.",
    )
    default_steps: int = Field(
        30, ge=1, le=1000, description="Steps for `quality: auto` or an unlisted quality."
    )


class AuthConfig(StrictConfig):
    """API keys: with either source set, every `/v1/` route wants `Authorization: Bearer KEY`
    (OpenAI's header, so the SDK's `api_key` works); health, readiness and docs stay open."""

    api_keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the keys, comma-separated (set it on the "
        "Router with runtime_env env_vars).",
    )
    api_keys_file: str | None = Field(
        None, min_length=1, description="A file on the Router's node with one key per line."
    )

    def load_keys(self) -> tuple[str, ...]:
        """The configured keys; an empty tuple means authentication is off. A configured but
        empty source fails loudly: an operator who asked for keys must not get an open API."""
        import os
        from pathlib import Path

        keys: list[str] = []
        if self.api_keys_env is not None:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",")]
        if self.api_keys_file is not None:
            keys += [k.strip() for k in Path(self.api_keys_file).read_text().splitlines()]
        keys = [key for key in keys if key and not key.startswith("#")]
        if (self.api_keys_env or self.api_keys_file) and not keys:
            raise ValueError("auth is configured but no API key was found in its source")
        return tuple(keys)


class StorageConfig(StrictConfig):
    """Where `response_format: url` images go (fsspec), and how long their links live."""

    url: str = Field(
        min_length=1,
        description="`file:///folder`, a plain folder, or `s3://bucket/prefix` (s3fs; "
        "credentials from the environment).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options, e.g. s3fs's endpoint_url."
    )
    link_ttl_s: int = Field(
        3600, ge=60, le=7 * 86_400, description="How long a returned image URL works."
    )
    signing_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable with the secret that signs `file://` links; unset: "
        "a random one per Router start (links then work only on the replica that made them).",
    )


class CacheConfig(StrictConfig):
    capacity_bytes: int = Field(
        64 * 1024**3, ge=1, description="Object-store bytes held before LRU eviction."
    )
    retry_failed_after_s: float = Field(
        30.0,
        ge=0,
        le=86_400,
        description="A failed load is retried by the first request after this long; requests "
        "before then get the recorded error without touching the source.",
    )


def _options(**kwargs: Any) -> Any:
    return Field(default_factory=lambda: DeploymentOptions(**kwargs))


class AppConfig(StrictConfig):
    """Everything `build_app` takes."""

    models: list[ModelConfig] = Field(min_length=1, description="Locally served models.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="ClipEncoder.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="ModelCache.")
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig, description="SDXLPipeline's step batcher."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="UNet fast paths.")
    openai_images: OpenAIImagesConfig = Field(
        default_factory=OpenAIImagesConfig, description="OpenAI's Images API."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys (off if unset).")
    storage: StorageConfig | None = Field(
        None, description="Output storage for `response_format: url`; none if unset."
    )
    router_deployment: DeploymentOptions = _options(num_cpus=0.1, max_ongoing_requests=64)
    encoder_deployment: DeploymentOptions = _options(num_cpus=0.1, max_ongoing_requests=32)
    # Requests a replica takes at once: its step batcher serves them together.
    pipeline_deployment: DeploymentOptions = _options(num_cpus=0.5, max_ongoing_requests=16)
    cache_deployment: DeploymentOptions = _options(num_cpus=0.1, max_ongoing_requests=64)
    providers: list[ProviderConfig] = Field(
        default_factory=list, description="Remote image APIs, served as `provider/model` ids."
    )
    provider_deployment: DeploymentOptions = _options(num_cpus=0.05, max_ongoing_requests=64)

    @model_validator(mode="after")
    def _unique_ids(self) -> AppConfig:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {', '.join(duplicates)}")
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        for model in self.models:
            if model.fallback and self.provider_model(model.fallback) is None:
                raise ValueError(
                    f"model {model.id!r}: fallback {model.fallback!r} is not a configured "
                    "`provider/model`"
                )
        return self

    def provider_model(self, model_id: str) -> tuple[ProviderConfig, str] | None:
        """(provider, provider's model name) for a `provider/model` id, else None."""
        name, _, model = model_id.partition("/")
        provider = next((p for p in self.providers if p.name == name), None)
        if provider is None or model not in provider.models:
            return None
        return provider, model

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)

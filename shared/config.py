"""Application arguments (`args:` in serve_config.yaml), validated once at deploy time.

Every model forbids unknown keys, so a typo fails `serve run` with the field's name. Every field
has a description and bounds; limits here are what the Router enforces at the edge.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.providers.config import ProviderConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsConfig(_Strict):
    """Request limits enforced by the Router before any work is queued."""

    min_side: int = Field(64, ge=8, le=8192, description="Smallest width/height in pixels.")
    max_side: int = Field(2048, ge=8, le=8192, description="Largest width/height in pixels.")
    max_pixels: int = Field(
        1024 * 1024 * 2, ge=64, le=8192 * 8192, description="Largest width*height per image."
    )
    max_steps: int = Field(100, ge=1, le=1000, description="Most denoising steps per request.")
    max_n: int = Field(4, ge=1, le=64, description="Most images per request.")
    max_guidance_scale: float = Field(30.0, ge=0, le=100, description="Largest guidance scale.")
    max_prompt_chars: int = Field(2000, ge=1, le=100_000, description="Longest prompt (chars).")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, le=100_000_000, description="Largest HTTP request body in bytes."
    )
    preview_max_side: int = Field(256, ge=16, le=2048, description="Longest side of a preview.")

    @model_validator(mode="after")
    def _ordered(self) -> LimitsConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) exceeds max_side ({self.max_side})")
        return self


class ModelConfig(_Strict):
    """One locally served SDXL model."""

    id: str = Field(min_length=1, max_length=200, description="Name clients put in `model`.")
    source: str = Field(
        min_length=1,
        description="`tiny`/`small` (built in), a local folder, `s3://bucket/prefix`, or an HF id.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Compute dtype of UNet and text encoders (the VAE decodes in fp32)."
    )
    variant: str | None = Field(None, description="Weight file variant, e.g. `fp16`.")
    default_width: int = Field(64, ge=8, le=8192, description="Width when a request omits it.")
    default_height: int = Field(64, ge=8, le=8192, description="Height when a request omits it.")
    default_steps: int = Field(20, ge=1, le=1000, description="Steps when a request omits them.")
    default_scheduler: str | None = Field(
        None, description="Sampler when a request omits it; the checkpoint's own if unset."
    )
    preview_decoder: str | None = Field(
        "taesd",
        description="AutoencoderTiny for `tiny` previews: a subfolder of the source or another "
        "source (e.g. madebyollin/taesdxl); unset disables them.",
    )
    preload: bool = Field(True, description="Load weights into the object store at startup.")
    allow_pickle: bool = Field(
        False, description="Allow .bin/.pt checkpoints (loaded with weights_only=True)."
    )
    sha256: dict[str, str] = Field(
        default_factory=dict, description="Expected sha256 per file path relative to the source."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec/s3fs options (endpoint_url, anon, client_kwargs.region_name, ...); "
        "credentials come from the environment.",
    )
    fallback: str | None = Field(
        None, description="Provider model (`provider/model`) to spill over to when busy."
    )


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0, le=1000, description="Replicas kept when idle.")
    max_replicas: int = Field(2, ge=1, le=1000, description="Most replicas under load.")
    target_ongoing_requests: float = Field(
        1.0, gt=0, le=100, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(10.0, ge=0, le=3600, description="Load must last this long.")
    downscale_delay_s: float = Field(120.0, ge=0, le=36000, description="Idle this long to shrink.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling min_replicas exceeds max_replicas")
        return self


class DeploymentOptions(_Strict):
    """Serve options of one deployment; Serve's defaults are wrong for GPU work, so all are set."""

    num_cpus: float = Field(0.1, ge=0, le=256, description="CPUs reserved per replica.")
    num_gpus: float = Field(0, ge=0, le=16, description="GPUs reserved per replica.")
    num_replicas: int | None = Field(
        None, ge=1, le=1000, description="Fixed replica count (ignored if autoscaling is set)."
    )
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscaling, if any.")
    max_ongoing_requests: int = Field(4, ge=1, le=10_000, description="Concurrent per replica.")
    max_queued_requests: int = Field(
        16, ge=-1, le=100_000, description="Queued per caller before 429 (-1: unbounded)."
    )
    graceful_shutdown_timeout_s: float = Field(
        60, ge=0, le=3600, description="Time to finish in-flight requests on scale-down."
    )
    health_check_period_s: float = Field(10, gt=0, le=600, description="Health check period.")
    health_check_timeout_s: float = Field(60, gt=0, le=3600, description="Health check timeout.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. `{cpu_pool: 0.01}` to pin ModelCache "
        "to nodes that are never scaled away.",
    )

    @model_validator(mode="after")
    def _custom_resources(self) -> DeploymentOptions:
        reserved = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(self.resources))
        if reserved:
            raise ValueError(
                f"resources: use num_cpus/num_gpus, not {', '.join(reserved)}; `resources` names "
                "custom resources that a node advertises (ray start --resources)"
            )
        negative = sorted(name for name, amount in self.resources.items() if amount <= 0)
        if negative:
            raise ValueError(f"resources must be positive amounts; got {', '.join(negative)}")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`."""
        options: dict[str, Any] = {
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                **({"resources": dict(self.resources)} if self.resources else {}),
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


class EncoderConfig(_Strict):
    batch_max_size: int = Field(8, ge=1, le=256, description="Most prompts per encoder batch.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, le=1, description="How long a batch waits to fill."
    )
    cache_entries: int = Field(1024, ge=0, le=1_000_000, description="Embedding LRU size.")


class CacheConfig(_Strict):
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


class AppConfig(_Strict):
    """Everything `build_app` takes."""

    models: list[ModelConfig] = Field(min_length=1, description="Locally served models.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="ClipEncoder.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="ModelCache.")
    router_deployment: DeploymentOptions = _options(num_cpus=0.1, max_ongoing_requests=64)
    encoder_deployment: DeploymentOptions = _options(num_cpus=0.1, max_ongoing_requests=32)
    pipeline_deployment: DeploymentOptions = _options(num_cpus=0.5, max_ongoing_requests=2)
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

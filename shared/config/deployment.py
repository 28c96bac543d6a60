"""Serve options of one deployment, every one set explicitly (Serve's defaults are wrong for GPU
work)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from shared.config.base import StrictConfig


class AutoscalingConfig(StrictConfig):
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


class DeploymentOptions(StrictConfig):
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

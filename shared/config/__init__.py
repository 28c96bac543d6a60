"""Application arguments (`args:` in serve_config.yaml), validated once at deploy time.

`AppConfig` is what `build_app` takes; models and limits, deployment options and the app's own
sections live in the submodules and are re-exported here.
"""

from shared.config.app import (
    AppConfig,
    AuthConfig,
    BatchingConfig,
    CacheConfig,
    EncoderConfig,
    EngineConfig,
    OpenAIImagesConfig,
    StorageConfig,
)
from shared.config.deployment import AutoscalingConfig, DeploymentOptions
from shared.config.models import (
    CONTROLNET_PREFIX,
    LORA_PREFIX,
    ControlNetConfig,
    IPAdapterConfig,
    LimitsConfig,
    LoraConfig,
    ModelConfig,
    RefinerConfig,
)

__all__ = [
    "CONTROLNET_PREFIX",
    "LORA_PREFIX",
    "AppConfig",
    "AuthConfig",
    "AutoscalingConfig",
    "BatchingConfig",
    "CacheConfig",
    "ControlNetConfig",
    "DeploymentOptions",
    "EncoderConfig",
    "EngineConfig",
    "IPAdapterConfig",
    "LimitsConfig",
    "LoraConfig",
    "ModelConfig",
    "OpenAIImagesConfig",
    "RefinerConfig",
    "StorageConfig",
]

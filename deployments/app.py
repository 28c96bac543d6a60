"""The one place the graph is wired: `build_app(args)` is serve_config.yaml's import_path."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from deployments.encoder import ClipEncoder
from deployments.model_cache import ModelCache
from deployments.providers import CloudProvider
from deployments.router import Router
from deployments.sdxl import SDXLPipeline
from shared.config import AppConfig


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` (fails at deploy time, naming the field) and bind the deployment graph."""
    try:
        config = AppConfig.model_validate(args)
    except ValidationError as exc:
        raise ValueError(f"invalid diffusion-serve app args:\n{exc}") from None
    cache = ModelCache.options(**config.cache_deployment.serve_options()).bind(config)
    encoder = ClipEncoder.options(**config.encoder_deployment.serve_options()).bind(config, cache)
    pipeline = SDXLPipeline.options(**config.pipeline_deployment.serve_options()).bind(
        config, cache
    )
    providers = {
        provider.name: CloudProvider.options(
            name=f"CloudProvider-{provider.name}", **config.provider_deployment.serve_options()
        ).bind(provider)
        for provider in config.providers
    }
    router = Router.options(**config.router_deployment.serve_options())
    return router.bind(config, encoder, pipeline, cache, providers)

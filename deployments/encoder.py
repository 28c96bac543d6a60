"""ClipEncoder: SDXL's two CLIP text encoders behind a batching, caching Serve deployment.

Concurrent requests are batched with `@serve.batch` into one forward pass per encoder; identical
(model, prompt, negative) triples are answered from an LRU without touching the encoders.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import ray
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from deployments.model_cache import fetch_components
from shared.api.jobs import PromptEmbeddings
from shared.config import AppConfig
from shared.errors import InvalidRequestError
from shared.weights.loader import TEXT_COMPONENTS

if TYPE_CHECKING:
    from shared.engine.prompts import PromptEncoder

logger = logging.getLogger("ray.serve")
EncodeKey = tuple[str, str, str | None]


@serve.deployment(name="ClipEncoder")
class ClipEncoder:
    # An async constructor (Serve awaits it): a replica takes traffic only once the encoders of
    # every `preload: true` model are built and have run once.
    async def __init__(self, config: AppConfig, cache: DeploymentHandle) -> None:  # type: ignore[misc]
        # torch and transformers are imported here, in the replica, never where the app is built.
        from shared.engine.build import build_prompt_encoder
        from shared.engine.modules import pick_device

        self._config = config
        self._cache = cache
        self._build = build_prompt_encoder
        self._device = pick_device(len(ray.get_gpu_ids()))  # a GPU only if the config gives one
        self._encoders: dict[str, PromptEncoder] = {}
        self._locks = {m.id: asyncio.Lock() for m in config.models}
        self._lru: OrderedDict[EncodeKey, PromptEmbeddings] = OrderedDict()
        self._lru_size = config.encoder.cache_entries
        self._encode_batch.set_max_batch_size(config.encoder.batch_max_size)
        self._encode_batch.set_batch_wait_timeout_s(config.encoder.batch_wait_timeout_s)
        self._cache_hits = metrics.Counter("encoder_cache_hits", description="Embedding LRU hits.")
        self._batch_sizes = metrics.Histogram(
            "encoder_batch_size", description="Prompts per encoder batch.", boundaries=[1, 2, 4, 8]
        )
        await self._preload()

    async def encode(self, model_id: str, prompt: str, negative: str | None) -> PromptEmbeddings:
        """Embeddings for one prompt pair; raises InvalidRequestError for over-long prompts."""
        key = (model_id, prompt, negative)
        if key in self._lru:
            self._lru.move_to_end(key)
            self._cache_hits.inc()
            return self._lru[key]
        await self._encoder(model_id)
        embeddings = await self._encode_batch(key)
        if isinstance(embeddings, InvalidRequestError):  # batches return errors per slot
            raise embeddings
        self._remember(key, embeddings)
        return embeddings

    async def ping(self) -> str:
        return "ok"

    async def _preload(self) -> None:
        for model in self._config.models:
            if not model.preload:
                continue
            try:
                await self.encode(model.id, "", None)
            except Exception as exc:  # the model's failure is reported by ModelCache
                logger.warning("could not preload the text encoders of %s: %r", model.id, exc)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _encode_batch(
        self, keys: list[EncodeKey]
    ) -> list[PromptEmbeddings | InvalidRequestError]:
        self._batch_sizes.observe(len(keys))
        by_model: dict[str, list[int]] = {}
        for index, (model_id, _, _) in enumerate(keys):
            by_model.setdefault(model_id, []).append(index)
        results: list[PromptEmbeddings | InvalidRequestError | None] = [None] * len(keys)
        for model_id, indices in by_model.items():
            encoder = self._encoders[model_id]
            pairs = [(keys[i][1], keys[i][2]) for i in indices]
            encoded = await asyncio.to_thread(encoder.encode, pairs)
            for index, embeddings in zip(indices, encoded, strict=True):
                results[index] = embeddings
        return [r for r in results if r is not None]

    async def _encoder(self, model_id: str) -> PromptEncoder:
        if model_id in self._encoders:
            return self._encoders[model_id]
        async with self._locks.setdefault(model_id, asyncio.Lock()):
            if model_id not in self._encoders:
                components = await fetch_components(self._cache, model_id, TEXT_COMPONENTS)
                model = self._config.model(model_id)
                dtype = model.dtype if model is not None else "float32"
                self._encoders[model_id] = await asyncio.to_thread(
                    self._build, components, dtype, self._device
                )
        return self._encoders[model_id]

    def _remember(self, key: EncodeKey, embeddings: PromptEmbeddings) -> None:
        if self._lru_size == 0:
            return
        self._lru[key] = embeddings
        while len(self._lru) > self._lru_size:
            self._lru.popitem(last=False)

"""ClipEncoder: SDXL's two CLIP text encoders and a CLIP vision encoder behind a batching,
caching Serve deployment.

Concurrent requests are batched with `@serve.batch` into one forward pass per encoder: prompt
pairs for generation, images for IP-Adapter image prompts, texts and images for /v1/embeddings.
Identical inputs (same model, same prompt pair / text / pixels) are answered from one LRU without
touching the encoders.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from deployments.model_cache import fetch_components
from shared.api.jobs import PromptEmbeddings
from shared.caching import ByteLRU
from shared.config import AppConfig
from shared.errors import InvalidRequestError
from shared.memory import bound_heap_growth
from shared.weights.loader import REFINER_INDEX, TEXT_COMPONENTS

if TYPE_CHECKING:
    from shared.engine.prompts import PromptEncoder
    from shared.engine.vision import ImageEncoder

logger = logging.getLogger("ray.serve")
EncodeKey = tuple[str, str, str | None, bool | None]  # model, prompt, negative, force_zeros
# LRU keys start with their kind ("prompt", "text", "image"), so no two kinds can collide.
CacheKey = tuple[str | None, ...]
# Run once through a preloaded model's vision encoder, to build and warm it.
_WARMUP_IMAGE = np.zeros((64, 64, 3), dtype=np.uint8)


@dataclass
class _Encoders:
    """One model's encoders in this replica; `image` only for a model with an IP-Adapter."""

    text: PromptEncoder
    image: ImageEncoder | None
    # The refiner's rule for an empty negative (its model_index.json), None without a refiner.
    refiner_zeros: bool | None = None


def _check_pixels(pixels: Any, param: str) -> None:
    if not (
        isinstance(pixels, np.ndarray)
        and pixels.dtype == np.uint8
        and pixels.ndim == 3
        and pixels.shape[2] == 3
        and min(pixels.shape[:2]) > 0
    ):
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels)
        raise InvalidRequestError(
            f"{param} must be an RGB image (uint8, height x width x 3); got {got}", param=param
        )


def _image_key(model_id: str, pixels: np.ndarray) -> CacheKey:
    digest = hashlib.sha256(np.ascontiguousarray(pixels).data).hexdigest()
    return ("image", model_id, digest, "x".join(map(str, pixels.shape)))


def _normalised(vector: np.ndarray) -> np.ndarray:
    flat = np.asarray(vector, dtype=np.float32).reshape(-1)
    return flat / max(float(np.linalg.norm(flat)), 1e-12)


def _by_model(items: list[Any]) -> dict[str, list[int]]:
    """Indices of a batch's items per model id (each item's first field)."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item[0], []).append(index)
    return groups


@serve.deployment(name="ClipEncoder")
class ClipEncoder:
    # An async constructor (Serve awaits it): a replica takes traffic only once the encoders of
    # every `preload: true` model are built and have run once.
    async def __init__(self, config: AppConfig, cache: DeploymentHandle) -> None:  # type: ignore[misc]
        # torch and transformers are imported here, in the replica, never where the app is built.
        from shared.engine.build import build_image_encoder, build_prompt_encoder
        from shared.engine.modules import pick_device

        bound_heap_growth()  # large images must not ratchet the replica's RSS up
        self._config = config
        self._cache = cache
        self._build = build_prompt_encoder
        self._build_image = build_image_encoder
        self._device = pick_device(len(ray.get_gpu_ids()))  # a GPU only if the config gives one
        self._encoders: dict[str, _Encoders] = {}
        self._locks = {m.id: asyncio.Lock() for m in config.models}
        self._lru = ByteLRU(config.encoder.cache_entries, config.encoder.cache_bytes)
        for batch in (self._encode_batch, self._image_batch, self._text_embed_batch):
            batch.set_max_batch_size(config.encoder.batch_max_size)
            batch.set_batch_wait_timeout_s(config.encoder.batch_wait_timeout_s)
        self._cache_hits = metrics.Counter("encoder_cache_hits", description="Embedding LRU hits.")
        self._cache_bytes = metrics.Gauge(
            "encoder_cache_bytes", description="Bytes held by the embedding LRU."
        )
        self._cache_entries = metrics.Gauge(
            "encoder_cache_entries", description="Entries in the embedding LRU."
        )
        self._batch_sizes = metrics.Histogram(
            "encoder_batch_size",
            description="Inputs per encoder batch.",
            boundaries=[1, 2, 4, 8],
            tag_keys=("kind",),
        )
        await self._preload()

    async def encode(
        self, model_id: str, prompt: str, negative: str | None, refiner: bool = False
    ) -> PromptEmbeddings:
        """Embeddings for one prompt pair; raises InvalidRequestError for over-long prompts.
        `refiner`: as the model's refiner reads them, whose checkpoint may encode an empty
        negative where the base zeroes it (SDXL refiner 1.0 does)."""
        encoders = await self._models(model_id)
        zeros = encoders.refiner_zeros if refiner else None
        if zeros == encoders.text.force_zeros_for_empty_prompt:
            zeros = None  # the base's own rule: the same embeddings, the same cache entry
        key = ("prompt", model_id, prompt, negative, None if zeros is None else str(zeros))
        if (cached := self._recall(key)) is not None:
            return cached
        embeddings = await self._encode_batch((model_id, prompt, negative, zeros))
        if isinstance(embeddings, InvalidRequestError):  # batches return errors per slot
            raise embeddings
        self._remember(key, embeddings)
        return embeddings

    async def encode_image(self, model_id: str, pixels: np.ndarray) -> np.ndarray:
        """(1, dim) float32 CLIP image embeddings of an IP-Adapter image prompt (uint8 HWC RGB)."""
        self._require_image_encoder(model_id, "image_prompt_unsupported", "image_prompt")
        _check_pixels(pixels, "image_prompt")
        return await self._image_embeds(model_id, pixels)

    async def embed(
        self, model_id: str, inputs: list[str | np.ndarray]
    ) -> tuple[list[np.ndarray], int]:
        """L2-normalised float32 CLIP embeddings in one space, one 1-D vector per input (a text
        -> text_encoder_2's projected pooled embedding, an image (uint8 HWC RGB) -> the vision
        encoder's image embedding), and the texts' token count."""
        images = [item for item in inputs if not isinstance(item, str)]
        if images:
            self._require_image_encoder(model_id, "image_input_unsupported", "input")
        for image in images:
            _check_pixels(image, "input")
        raw = await asyncio.gather(
            *(
                self._text_embeds(model_id, item)
                if isinstance(item, str)
                else self._image_embeds(model_id, item)
                for item in inputs
            )
        )
        texts = [item for item in inputs if isinstance(item, str)]
        tokens = (await self._models(model_id)).text.token_count(texts) if texts else 0
        return [_normalised(vector) for vector in raw], tokens

    async def ping(self) -> str:
        return "ok"

    async def _preload(self) -> None:
        for model in self._config.models:
            if not model.preload:
                continue
            try:
                await self.encode(model.id, "", None)
                if model.ip_adapter is not None:
                    await self.encode_image(model.id, _WARMUP_IMAGE)
            except Exception as exc:  # the model's failure is reported by ModelCache
                logger.warning("could not preload the encoders of %s: %r", model.id, exc)

    # ------------------------------------------------------------------------------- inputs

    def _require_image_encoder(self, model_id: str, code: str, param: str) -> None:
        """Refuse images for a configured model without an IP-Adapter (an unknown model is left
        to the cache, which answers 404)."""
        model = self._config.model(model_id)
        if model is not None and model.ip_adapter is None:
            able = [m.id for m in self._config.models if m.ip_adapter is not None]
            raise InvalidRequestError(
                f"model {model_id!r} has no IP-Adapter configured, so it takes no image "
                f"inputs; models that do: {', '.join(able) or 'none'}",
                code=code,
                param=param,
            )

    async def _image_embeds(self, model_id: str, pixels: np.ndarray) -> np.ndarray:
        key = _image_key(model_id, pixels)
        if (cached := self._recall(key)) is not None:
            return cached
        await self._models(model_id)
        embeds = await self._image_batch((model_id, pixels))
        self._remember(key, embeds)
        return embeds

    async def _text_embeds(self, model_id: str, text: str) -> np.ndarray:
        key = ("text", model_id, text)
        if (cached := self._recall(key)) is not None:
            return cached
        await self._models(model_id)
        embeds = await self._text_embed_batch((model_id, text))
        if isinstance(embeds, InvalidRequestError):
            raise embeds
        self._remember(key, embeds)
        return embeds

    # ------------------------------------------------------------------------------ batches

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _encode_batch(
        self, keys: list[EncodeKey]
    ) -> list[PromptEmbeddings | InvalidRequestError]:
        self._batch_sizes.observe(len(keys), tags={"kind": "prompt"})
        results: list[Any] = [None] * len(keys)
        groups: dict[tuple[str, bool | None], list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault((key[0], key[3]), []).append(index)
        for (model_id, zeros), indices in groups.items():
            pairs = [(keys[i][1], keys[i][2]) for i in indices]
            encode = self._encoders[model_id].text.encode
            encoded = await asyncio.to_thread(encode, pairs, zeros)
            for index, embeddings in zip(indices, encoded, strict=True):
                results[index] = embeddings
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _image_batch(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        self._batch_sizes.observe(len(items), tags={"kind": "image"})
        results: list[Any] = [None] * len(items)
        for model_id, indices in _by_model(items).items():
            encoder = self._encoders[model_id].image
            assert encoder is not None  # _require_image_encoder let only IP-Adapter models in
            embeds = await asyncio.to_thread(encoder.encode, [items[i][1] for i in indices])
            for row, index in enumerate(indices):
                # A copy: a view would keep the whole batch's buffer alive in the LRU.
                results[index] = embeds[row : row + 1].copy()
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _text_embed_batch(
        self, items: list[tuple[str, str]]
    ) -> list[np.ndarray | InvalidRequestError]:
        self._batch_sizes.observe(len(items), tags={"kind": "text"})
        results: list[Any] = [None] * len(items)
        for model_id, indices in _by_model(items).items():
            texts = [items[i][1] for i in indices]
            embedded = await asyncio.to_thread(self._encoders[model_id].text.embed, texts)
            for index, embeds in zip(indices, embedded, strict=True):
                results[index] = embeds
        return results

    # ------------------------------------------------------------------------------- models

    async def _models(self, model_id: str) -> _Encoders:
        if model_id in self._encoders:
            return self._encoders[model_id]
        async with self._locks.setdefault(model_id, asyncio.Lock()):
            if model_id not in self._encoders:
                names = (*TEXT_COMPONENTS, REFINER_INDEX)
                components = await fetch_components(self._cache, model_id, names)
                model = self._config.model(model_id)
                dtype = model.dtype if model is not None else "float32"
                text = await asyncio.to_thread(self._build, components, dtype, self._device)
                image = await asyncio.to_thread(self._build_image, components, dtype, self._device)
                index = components.get(REFINER_INDEX)
                refiner_zeros = (
                    bool(index.config.get("force_zeros_for_empty_prompt", False))
                    if index is not None
                    else None
                )
                self._encoders[model_id] = _Encoders(text, image, refiner_zeros)
        return self._encoders[model_id]

    # ---------------------------------------------------------------------------------- LRU

    def _recall(self, key: CacheKey) -> Any:
        value = self._lru.get(key)
        if value is not None:
            self._cache_hits.inc()
        return value

    def _remember(self, key: CacheKey, value: Any) -> None:
        self._lru.put(key, value)
        self._cache_bytes.set(self._lru.bytes)
        self._cache_entries.set(len(self._lru))

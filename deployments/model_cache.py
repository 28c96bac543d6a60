"""ModelCache: the owner of every model's weights in the Ray object store (the RAM cache).

Objects die with their owner, so weights are `ray.put` here — in a fixed, long-lived replica —
and never by a replica that autoscaling may remove. Replicas receive `ObjectRef`s and read the
arrays zero-copy from their node's store; Ray copies them between nodes on first use.

SDXLPipeline replicas hold a lease on each model they have built (`get(holder=...)` until
`release`); past capacity, only models that no live replica holds are evicted.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from shared.config import AppConfig, ModelConfig
from shared.errors import ModelLoadError, NotFoundError, ServeError
from shared.weights import ComponentWeights, ModelWeights, load_model

logger = logging.getLogger("ray.serve")
LOST_OBJECT_ERRORS = (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)


async def fetch_components(
    cache: DeploymentHandle, model_id: str, names: tuple[str, ...], holder: str | None = None
) -> dict[str, ComponentWeights]:
    """Fetch components of `model_id` from the object store through the ModelCache.

    A lost object (cache replica died, node gone) means "reload", never a hang: the cache is told
    which refs were lost and reloads from the source once, however many replicas report them.
    A `holder` (the replica's actor name) marks the model in use until it calls `release`.
    """
    refs = await cache.get.remote(model_id, holder=holder)
    try:
        return await _gather(refs, names)
    except LOST_OBJECT_ERRORS:
        logger.warning("weights of %s were lost from the object store; reloading", model_id)
    stale = [ref.hex() for ref in refs.values()]
    return await _gather(await cache.get.remote(model_id, stale=stale, holder=holder), names)


def _live_actor_names() -> set[str]:
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}


async def _gather(refs: dict[str, ray.ObjectRef], names: tuple[str, ...]) -> dict[str, Any]:
    wanted = {name: refs[name] for name in names if name in refs}
    return dict(zip(wanted, await asyncio.gather(*wanted.values()), strict=True))


def _unexpected_load_error(model: ModelConfig, exc: Exception) -> ModelLoadError:
    logger.exception("unexpected error loading model %s", model.id, exc_info=exc)
    return ModelLoadError(f"model {model.id!r} could not be loaded: {type(exc).__name__}: {exc}")


@dataclass
class CacheEntry:
    state: str = "not_loaded"  # not_loaded | loading | cached | failed
    refs: dict[str, ray.ObjectRef] = field(default_factory=dict)
    nbytes: int = 0
    error: ServeError | None = None
    last_used: float = 0.0
    failed_at: float = 0.0
    load_seconds: float = 0.0
    loads: int = 0  # reads from the source, failed ones included
    holders: set[str] = field(default_factory=set)  # replicas that built modules from the refs

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "state": self.state,
            "bytes": self.nbytes,
            "loads": self.loads,
            "holders": len(self.holders),
        }
        if self.state == "cached":
            info["load_seconds"] = round(self.load_seconds, 3)
        if self.error is not None:
            info["error"] = self.error.to_dict()
        return info


@serve.deployment(name="ModelCache")
class ModelCache:
    """Loads each model once, holds its components as object refs, evicts LRU past capacity."""

    def __init__(self, config: AppConfig, loader: Any = load_model) -> None:
        self._config = config
        self._load = loader
        self._models = {m.id: m for m in config.models}
        self._entries = {m.id: CacheEntry() for m in config.models}
        self._locks = {m.id: asyncio.Lock() for m in config.models}
        self._bytes = metrics.Gauge("model_cache_bytes", description="Bytes of weights held.")
        self._hits = metrics.Counter("model_cache_hits", description="Requests served from RAM.")
        self._loads = metrics.Counter(
            "model_cache_loads", description="Loads from source.", tag_keys=("model", "outcome")
        )
        self._load_seconds = metrics.Histogram(
            "model_cache_load_seconds",
            description="Seconds to read a model from its source into the object store.",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300],
            tag_keys=("model",),
        )
        self._bytes.set(0)
        for model in config.models:
            if model.preload:
                self._load_now(model)

    async def get(
        self, model_id: str, stale: list[str] | None = None, holder: str | None = None
    ) -> dict[str, ray.ObjectRef]:
        """Refs of every component of `model_id`, loading it once even under concurrent calls.

        `stale` lists refs a replica found lost; if they are still the current ones, the model is
        reloaded from its source (once: later reporters of the same refs get the new ones).
        `holder` names a replica that will keep the model in use until it calls `release`.
        """
        entry = self._entry(model_id)
        async with self._locks[model_id]:
            lost = any(ref.hex() in (stale or ()) for ref in entry.refs.values())
            if entry.state == "cached" and not lost:
                self._hits.inc()
            elif not self._failed_recently(entry):
                await self._load_locked(self._models[model_id])
            entry.last_used = time.monotonic()
            if entry.error is not None:
                # A fresh copy each time: re-raising one object would chain every request's
                # frames onto its traceback (and keep them alive) for as long as the model fails.
                raise copy.copy(entry.error)
            if holder is not None:
                entry.holders.add(holder)
            return dict(entry.refs)

    async def release(self, model_id: str, holder: str) -> None:
        """`holder` unloaded `model_id`: once nobody holds it, it may be evicted, which happens
        now if the cache is past capacity (a load that found every model in use left it so)."""
        self._entry(model_id).holders.discard(holder)
        await asyncio.to_thread(self._evict, None)
        self._bytes.set(self._cached_bytes())

    async def status(self) -> dict[str, dict[str, Any]]:
        return {model_id: entry.describe() for model_id, entry in self._entries.items()}

    async def ping(self) -> str:
        return "ok"

    def _failed_recently(self, entry: CacheEntry) -> bool:
        """A broken source is not re-read for every request (a 7 GB checkpoint with a bad
        checksum would be downloaded again each time); it is retried after a pause."""
        retry_after = self._config.cache.retry_failed_after_s
        return entry.state == "failed" and time.monotonic() - entry.failed_at < retry_after

    def _entry(self, model_id: str) -> CacheEntry:
        if model_id not in self._entries:
            raise NotFoundError(f"model {model_id!r} is not configured", code="model_not_found")
        return self._entries[model_id]

    async def _load_locked(self, model: ModelConfig) -> None:
        await asyncio.to_thread(self._load_now, model)

    def _load_now(self, model: ModelConfig) -> None:
        """Read and store one model; a failure is recorded (and reported), never a crash loop."""
        entry = self._entries[model.id]
        entry.state, entry.error = "loading", None
        entry.loads += 1
        try:
            self._store(model, self._read(model))
        except Exception as exc:  # any failure, expected or not, is this model's, not the cache's
            error = exc if isinstance(exc, ServeError) else _unexpected_load_error(model, exc)
            entry.state, entry.error, entry.refs = "failed", error, {}
            entry.failed_at = time.monotonic()
            self._loads.inc(tags={"model": model.id, "outcome": "failed"})
            logger.error("loading model %s failed: %s", model.id, error.message)

    def _read(self, model: ModelConfig) -> tuple[ModelWeights, float]:
        started = time.perf_counter()
        extra = {"taesd": model.preview_decoder} if model.preview_decoder else None
        weights = self._load(model, extra=extra)
        return weights, time.perf_counter() - started

    def _store(self, model: ModelConfig, loaded: tuple[ModelWeights, float]) -> None:
        weights, seconds = loaded
        entry = self._entries[model.id]
        entry.refs = {name: ray.put(part) for name, part in weights.components.items()}
        entry.nbytes, entry.load_seconds, entry.state = weights.nbytes, seconds, "cached"
        entry.last_used = time.monotonic()
        self._loads.inc(tags={"model": model.id, "outcome": "loaded"})
        self._load_seconds.observe(seconds, tags={"model": model.id})
        self._evict(keep=model.id)
        self._bytes.set(self._cached_bytes())
        logger.info("model %s cached: %.1f MB in %.2f s", model.id, weights.nbytes / 1e6, seconds)

    def _evict(self, keep: str | None) -> None:
        """Drop least-recently-used models that no live replica holds, while past capacity.

        A model in use is never evicted: its objects stay pinned by the replicas' zero-copy
        views, so dropping the refs would free nothing and a reload would store a second copy.
        Holders that died (crash, scale-down) are forgotten here.
        """
        capacity = self._config.cache.capacity_bytes
        if self._cached_bytes() <= capacity:
            return
        live = _live_actor_names()
        cached = [(e.last_used, i) for i, e in self._entries.items() if e.state == "cached"]
        for _, model_id in sorted(cached):
            entry = self._entries[model_id]
            entry.holders &= live
            if self._cached_bytes() <= capacity:
                return
            if model_id != keep and not entry.holders:
                logger.info("evicting model %s from the object store", model_id)
                entry.state, entry.refs, entry.nbytes = "not_loaded", {}, 0
        if self._cached_bytes() > capacity:
            logger.warning(
                "model cache over capacity (%d of %d bytes): every other model is in use",
                self._cached_bytes(),
                capacity,
            )

    def _cached_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.state == "cached")

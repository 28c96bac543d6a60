"""ModelCache: the owner of every model's weights in the Ray object store (the RAM cache).

Objects die with their owner, so weights are `ray.put` here — in a fixed, long-lived replica —
and never by a replica that autoscaling may remove. Replicas receive `ObjectRef`s and read the
arrays zero-copy from their node's store; Ray copies them between nodes on first use.

SDXLPipeline replicas hold a lease on each model they have built (`get(holder=...)` until
`release`); past capacity, only models that no live replica holds are evicted. The leases,
eviction, failure pause and reloads are `shared.weights.store.WeightStore`'s; this deployment
gives it `ray.put`, the live actors and metrics, and runs its blocking calls off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import ray
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from shared.config import AppConfig
from shared.weights.loader import ComponentWeights
from shared.weights.store import WeightStore

logger = logging.getLogger("ray.serve")
LOST_OBJECT_ERRORS = (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)
T = TypeVar("T")


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


async def _gather(refs: dict[str, ray.ObjectRef], names: tuple[str, ...]) -> dict[str, Any]:
    wanted = {name: refs[name] for name in names if name in refs}
    return dict(zip(wanted, await asyncio.gather(*wanted.values()), strict=True))


def _live_actor_names() -> set[str]:
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}


class _CacheMetrics:
    """The store's observer: Ray metrics of hits, loads and bytes held."""

    def __init__(self) -> None:
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

    def hit(self, model_id: str) -> None:
        self._hits.inc()

    def loaded(self, model_id: str, seconds: float) -> None:
        self._loads.inc(tags={"model": model_id, "outcome": "loaded"})
        self._load_seconds.observe(seconds, tags={"model": model_id})

    def failed(self, model_id: str) -> None:
        self._loads.inc(tags={"model": model_id, "outcome": "failed"})

    def stored(self, nbytes: int) -> None:
        self._bytes.set(nbytes)


@serve.deployment(name="ModelCache")
class ModelCache:
    """Loads each model once, holds its components as object refs, evicts LRU past capacity."""

    def __init__(self, config: AppConfig) -> None:
        self._store: WeightStore[ray.ObjectRef] = WeightStore(
            config.models,
            config.cache,
            put=ray.put,
            live_holders=_live_actor_names,
            observer=_CacheMetrics(),
        )
        # A thread per call the replica admits: calls waiting for one model's load must not
        # take the threads that serve the other models.
        self._executor = ThreadPoolExecutor(
            max_workers=config.cache_deployment.max_ongoing_requests,
            thread_name_prefix="model-cache",
        )
        self._store.preload()

    async def get(
        self, model_id: str, stale: list[str] | None = None, holder: str | None = None
    ) -> dict[str, ray.ObjectRef]:
        """Refs of every component of `model_id`, loading it once even under concurrent calls.

        `stale` lists refs a replica found lost; if they are still the current ones, the model is
        reloaded from its source (once: later reporters of the same refs get the new ones).
        `holder` names a replica that will keep the model in use until it calls `release`.
        """
        return await self._run(self._store.get, model_id, stale or (), holder)

    async def release(self, model_id: str, holder: str) -> None:
        """`holder` unloaded `model_id`; evicts now if the cache is past capacity."""
        await self._run(self._store.release, model_id, holder)

    async def defaults(self, model_id: str) -> dict[str, int]:
        """`{"width", "height"}` the checkpoint was trained for (`{}` if unknown)."""
        return await self._run(self._store.defaults, model_id)

    async def digests(self, model_id: str) -> dict[str, dict[str, str]]:
        """`{component: {file: sha256}}` of the weights replicas get for `model_id` (files keyed
        as the model's `sha256:` setting names them), from the store's records: no object is
        read. Loads the model if it is not cached."""
        return await self._run(self._store.digests, model_id)

    async def status(self) -> dict[str, dict[str, Any]]:
        return await self._run(self._store.describe)

    async def ping(self) -> str:
        return "ok"

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        """Blocking store calls (a load takes minutes) run in a thread, never on the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, call, *args)

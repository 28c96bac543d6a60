"""The ModelCache's state machine, without Ray: which models are stored, who holds them, and
which to evict.

`WeightStore` reads each model once (`load`), stores its components (`put`: `ray.put` in the
deployment) and hands out the refs. It keeps, per model:

- a lease per holder (an SDXLPipeline replica's actor name) from `get(holder=...)` to `release`;
- LRU eviction past `capacity_bytes` that never drops a held model (its objects stay pinned by
  the holders' zero-copy views, so dropping the refs would free nothing and a reload would store
  a second copy) and forgets holders that `live_holders()` no longer lists (crash, scale-down);
- a pause after a failed load (`retry_failed_after_s`), so a broken source is not re-read for
  every request;
- a reload when a replica reports the current refs lost (`get(stale=...)`), once however many
  replicas report the same refs;
- the checkpoint's own default image size (`defaults`);
- the sha256 of every file each component was read from (`digests`), kept beside the refs so
  that answering needs no object-store access.

Every call blocks (a load may take minutes) and is thread-safe. One state lock guards every
entry's state, refs, holders, bytes and recency, and is never held while reading a source, storing
objects or asking who is alive. A per-model load lock makes concurrent first `get`s load once,
while other models stay served. Lock order: load lock, then state lock.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from shared.config import CacheConfig, ModelConfig
from shared.errors import ModelLoadError, NotFoundError, ServeError
from shared.weights.loader import ComponentWeights, ModelWeights, load_suite

logger = logging.getLogger(__name__)

EntryState = Literal["not_loaded", "loading", "cached", "failed"]


class StoredRef(Protocol):
    """What `put` returns (a Ray `ObjectRef`): `hex()` is how replicas name a lost one."""

    def hex(self) -> str: ...


Ref = TypeVar("Ref", bound=StoredRef)


class StoreObserver(Protocol):
    """Metrics hook. Called with the state lock held, so reports arrive in order: keep it quick
    and never call back into the store."""

    def hit(self, model_id: str) -> None: ...

    def loaded(self, model_id: str, seconds: float) -> None: ...

    def failed(self, model_id: str) -> None: ...

    def stored(self, nbytes: int) -> None:
        """Bytes of every cached model, after each change."""


class _NoObserver:
    def hit(self, model_id: str) -> None:
        pass

    def loaded(self, model_id: str, seconds: float) -> None:
        pass

    def failed(self, model_id: str) -> None:
        pass

    def stored(self, nbytes: int) -> None:
        pass


def default_size(weights: ModelWeights) -> dict[str, int]:
    """The image size a checkpoint was trained for: the UNet's latent `sample_size` times the
    VAE's downscale factor. Empty when the configs do not say."""
    unet, vae = weights.components.get("unet"), weights.components.get("vae")
    if unet is None or vae is None:
        return {}
    sample, channels = unet.config.get("sample_size"), vae.config.get("block_out_channels")
    if not isinstance(channels, list | tuple) or not channels:
        return {}
    factor = 2 ** (len(channels) - 1)
    if isinstance(sample, int) and not isinstance(sample, bool):
        return {"width": sample * factor, "height": sample * factor}
    # diffusers also allows a (height, width) pair.
    if (
        isinstance(sample, list | tuple)
        and len(sample) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in sample)
    ):
        return {"width": sample[1] * factor, "height": sample[0] * factor}
    return {}


@dataclass
class CacheEntry(Generic[Ref]):
    model: ModelConfig
    state: EntryState = "not_loaded"
    refs: dict[str, Ref] = field(default_factory=dict)
    nbytes: int = 0
    defaults: dict[str, int] = field(default_factory=dict)
    digests: dict[str, dict[str, str]] = field(default_factory=dict)
    error: ServeError | None = None
    last_used: int = 0  # the store's use counter at the last lease: orders LRU eviction
    failed_at: float = 0.0
    load_seconds: float = 0.0
    loads: int = 0  # reads from the source, failed ones included
    holders: set[str] = field(default_factory=set)  # replicas that built modules from the refs
    load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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


@dataclass
class _Loaded(Generic[Ref]):
    """The outcome of one read-and-store, produced outside the state lock."""

    refs: dict[str, Ref] = field(default_factory=dict)
    nbytes: int = 0
    defaults: dict[str, int] = field(default_factory=dict)
    digests: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0
    error: ServeError | None = None


@dataclass
class _Lease(Generic[Ref]):
    """What one `get` hands out: copies, so callers never share the entry's dicts."""

    refs: dict[str, Ref]
    defaults: dict[str, int]
    digests: dict[str, dict[str, str]]


class WeightStore(Generic[Ref]):
    """Loads each model once, holds its components as refs, evicts LRU unheld ones past capacity."""

    def __init__(
        self,
        models: Sequence[ModelConfig],
        cache: CacheConfig,
        *,
        put: Callable[[ComponentWeights], Ref],
        live_holders: Callable[[], set[str]],
        load: Callable[[ModelConfig], ModelWeights] = load_suite,
        clock: Callable[[], float] = time.monotonic,
        observer: StoreObserver | None = None,
    ) -> None:
        self._cache = cache
        self._put = put
        self._live_holders = live_holders
        self._load = load
        self._clock = clock
        self._observer: StoreObserver = observer or _NoObserver()
        self._entries: dict[str, CacheEntry[Ref]] = {m.id: CacheEntry(m) for m in models}
        self._lock = threading.Lock()
        self._uses = 0

    # ------------------------------------------------------------------------------ public API

    def preload(self) -> None:
        """Load every model marked `preload`; a failure is recorded (and logged), never raised."""
        for model_id, entry in self._entries.items():
            if entry.model.preload:
                with contextlib.suppress(ServeError):
                    self.get(model_id)

    def get(
        self, model_id: str, stale: Collection[str] = (), holder: str | None = None
    ) -> dict[str, Ref]:
        """Refs of every component of `model_id`, loading it once even under concurrent calls.

        `stale` lists refs (`hex()`) a replica found lost; if they are still the current ones, the
        model is reloaded from its source (once: later reporters of the same refs get the new
        ones). `holder` names a replica that keeps the model in use until it calls `release`;
        the model is cached with `holder` among its holders when this returns.
        """
        return self._acquire(model_id, stale, holder).refs

    def defaults(self, model_id: str) -> dict[str, int]:
        """`{"width", "height"}` the checkpoint was trained for, or `{}` if its configs do not
        say. Loads the model if it is not cached; raises its error if it failed."""
        return self._acquire(model_id, (), None).defaults

    def digests(self, model_id: str) -> dict[str, dict[str, str]]:
        """`{component: {file: sha256}}` of the cached weights, files keyed as `sha256:` keys
        (relative to the model source). Loads the model if it is not cached (then the digests
        are those of the weights replicas get from now on); raises its error if it failed."""
        return self._acquire(model_id, (), None).digests

    def release(self, model_id: str, holder: str) -> None:
        """`holder` unloaded `model_id`: once nobody holds it, it may be evicted, which happens
        now if the store is past capacity (a load that found every model in use left it so)."""
        entry = self._entry(model_id)
        with self._lock:
            entry.holders.discard(holder)
        self._evict(keep=None)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per model: state, bytes, loads, holders (a count), load_seconds once cached, error."""
        with self._lock:
            return {model_id: entry.describe() for model_id, entry in self._entries.items()}

    # -------------------------------------------------------------------------------- leasing

    def _acquire(self, model_id: str, stale: Collection[str], holder: str | None) -> _Lease[Ref]:
        entry = self._entry(model_id)
        with entry.load_lock:
            with self._lock:
                lost = any(ref.hex() in stale for ref in entry.refs.values())
                if entry.state == "cached" and not lost:
                    self._observer.hit(model_id)
                    return self._lease(entry, holder)
                failure = self._recent_failure(entry)
                if failure is not None:
                    raise _fresh(failure)
                entry.state, entry.error, entry.refs, entry.nbytes = "loading", None, {}, 0
                entry.digests = {}
                entry.loads += 1
            loaded = self._read(entry.model)  # minutes, perhaps: other models stay served
            with self._lock:
                self._record(entry, loaded)
                if entry.error is not None:
                    raise _fresh(entry.error)
                # Registered in the same critical section that made the model cached: no
                # eviction can come between, and from here on the holder protects it.
                result = self._lease(entry, holder)
        self._evict(keep=model_id)
        return result

    def _lease(self, entry: CacheEntry[Ref], holder: str | None) -> _Lease[Ref]:
        """Call with the state lock held."""
        self._uses += 1
        entry.last_used = self._uses
        if holder is not None:
            entry.holders.add(holder)
        digests = {name: dict(files) for name, files in entry.digests.items()}
        return _Lease(dict(entry.refs), dict(entry.defaults), digests)

    def _recent_failure(self, entry: CacheEntry[Ref]) -> ServeError | None:
        """The error of a load that failed less than `retry_failed_after_s` ago: a broken source
        is not re-read for every request (a 7 GB checkpoint with a bad checksum would be
        downloaded again each time); it is retried after the pause."""
        if entry.state != "failed":
            return None
        if self._clock() - entry.failed_at >= self._cache.retry_failed_after_s:
            return None
        return entry.error

    def _entry(self, model_id: str) -> CacheEntry[Ref]:
        if model_id not in self._entries:
            raise NotFoundError(f"model {model_id!r} is not configured", code="model_not_found")
        return self._entries[model_id]

    # -------------------------------------------------------------------------------- loading

    def _read(self, model: ModelConfig) -> _Loaded[Ref]:
        """Read and store one model; any failure, expected or not, is this model's, not the
        store's, and is returned to be recorded."""
        started = self._clock()
        try:
            weights = self._load(model)
            refs = {name: self._put(part) for name, part in weights.components.items()}
        except ServeError as exc:
            return _Loaded(error=exc)
        except Exception as exc:
            logger.exception("unexpected error loading model %s", model.id)
            message = f"model {model.id!r} could not be loaded: {type(exc).__name__}: {exc}"
            return _Loaded(error=ModelLoadError(message))
        return _Loaded(
            refs, weights.nbytes, default_size(weights), weights.digests, self._clock() - started
        )

    def _record(self, entry: CacheEntry[Ref], loaded: _Loaded[Ref]) -> None:
        """Call with the state lock held."""
        model_id = entry.model.id
        if loaded.error is not None:
            entry.state, entry.error, entry.failed_at = "failed", loaded.error, self._clock()
            self._observer.failed(model_id)
            logger.error("loading model %s failed: %s", model_id, loaded.error.message)
            return
        entry.state, entry.refs, entry.nbytes = "cached", loaded.refs, loaded.nbytes
        entry.defaults, entry.load_seconds = loaded.defaults, loaded.seconds
        entry.digests = loaded.digests
        self._observer.loaded(model_id, loaded.seconds)
        self._observer.stored(self._cached_bytes())
        logger.info(
            "model %s cached: %.1f MB in %.2f s", model_id, loaded.nbytes / 1e6, loaded.seconds
        )

    # ------------------------------------------------------------------------------- eviction

    def _evict(self, keep: str | None) -> None:
        """Drop least-recently-used models that no live replica holds, while past capacity.

        Asking who is alive is a call to Ray's GCS, made without the state lock so that no `get`
        waits on it. Only holders seen before the question are forgotten if absent from the
        answer: a lease taken meanwhile is never lost. The decisions and the drops are made under
        the lock, so a `get` either finds the model cached and leases it before the drop, or
        finds it gone and loads it again.
        """
        with self._lock:
            if self._cached_bytes() <= self._cache.capacity_bytes:
                return
            seen = {h for entry in self._entries.values() for h in entry.holders}
        dead = seen - self._live_holders() if seen else set()
        with self._lock:
            for entry in self._entries.values():
                entry.holders -= dead
            self._drop_unheld(keep)
            self._observer.stored(self._cached_bytes())

    def _drop_unheld(self, keep: str | None) -> None:
        """Call with the state lock held."""
        capacity = self._cache.capacity_bytes
        cached = [e for e in self._entries.values() if e.state == "cached"]
        for entry in sorted(cached, key=lambda e: e.last_used):
            if self._cached_bytes() <= capacity:
                return
            if entry.model.id != keep and not entry.holders:
                logger.info("evicting model %s from the object store", entry.model.id)
                entry.state, entry.refs, entry.nbytes = "not_loaded", {}, 0
                entry.digests = {}
        if self._cached_bytes() > capacity:
            logger.warning(
                "model cache over capacity (%d of %d bytes): every other model is in use",
                self._cached_bytes(),
                capacity,
            )

    def _cached_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.state == "cached")


def _fresh(error: ServeError) -> ServeError:
    """A fresh copy each time: re-raising one object would chain every request's frames onto its
    traceback (and keep them alive) for as long as the model fails."""
    return copy.copy(error)

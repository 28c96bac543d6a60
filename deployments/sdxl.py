"""SDXLPipeline: UNet + VAE on one GPU (or the CPU), multiplexed by model and LoRA set.

Every request of the replica goes to its one `StepBatcher`, whose loop runs in its own thread and
serves all compatible requests with one UNet call per step; each request's events cross back to
the replica's event loop with `call_soon_threadsafe`. When a caller goes away Serve cancels its
generator at an `await`, the `finally` sets the request's flag and withdraws it from the queue if
it still waits; a running one is dropped before the next step while the others go on. Serve's
periodic `check_health` fails when the batcher's thread died or is stuck, so Serve replaces
the replica.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import platform
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from deployments.model_cache import fetch_components
from shared.api.jobs import DenoiseJob, base_model, multiplexed_id
from shared.api.schemas import (
    QueuedEvent,
    ResultEvent,
    ResultMetadata,
    SchedulerRecord,
    StepEvent,
)
from shared.config import AppConfig
from shared.errors import GenerationError, RequestCancelledError, UnavailableError
from shared.weights.loader import ENGINE_COMPONENTS

if TYPE_CHECKING:
    from shared.engine.sdxl import SDXLEngine

logger = logging.getLogger("ray.serve")
RECENT_JOBS = 256
MODELS_PER_REPLICA = 2  # engines (models) built per replica at once
# Multiplexed ids (a model, or a model + LoRA set) a replica advertises to Serve's routing.
ENTRIES_PER_REPLICA = 8
RELEASE_TIMEOUT_S = 2.0
PipelineEvent = QueuedEvent | StepEvent | ResultEvent
# Result metadata's `versions`: the key, and the distribution it is read from.
VERSIONED = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "ray": "ray",
    "diffusion_serve": "diffusion-serve",
}
_versions: dict[str, str] = {}  # read once per replica process


class _Entry:
    """What Serve's multiplexing keeps per multiplexed id: only its model's id (the engine is
    the replica's, shared by every entry of the model)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id


class _EventSink:
    """One request's `Sink`: the batcher's thread hands its events to the replica's event loop,
    and keeps the request's stats (steps run, largest batch) current for `job_stats`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        record: dict[str, Any],
        on_step: Callable[[StepEvent], None],
        stream_steps: bool = True,
    ) -> None:
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self._stream_steps = stream_steps
        self.flag = threading.Event()
        self._loop = loop
        self._record = record
        self._on_step = on_step

    def queued(self, event: QueuedEvent) -> None:
        self._put(event)

    def step(self, event: StepEvent, batch_requests: int) -> None:
        self._record["steps"] += 1
        self._record["max_batch_requests"] = max(self._record["max_batch_requests"], batch_requests)
        self._on_step(event)
        if self._stream_steps:
            self._put(event)

    def finish(self, outcome: ResultEvent | BaseException) -> None:
        self._put(outcome)  # the last item: a result, or the error to raise

    def cancelled(self) -> bool:
        return self.flag.is_set()

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the replica's loop is closed (shutting down): nobody listens
            self.flag.set()


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (direct construction in tests)
        return "local"


def _actor_name() -> str | None:
    """This replica's actor name: how the ModelCache tells live holders of a model from dead."""
    return ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _library_versions() -> dict[str, str]:
    if not _versions:
        for key, distribution in VERSIONED.items():
            try:
                _versions[key] = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                _versions[key] = "not installed"
        _versions["python"] = platform.python_version()
    return dict(_versions)


def _scheduler_record(engine: SDXLEngine, name: str | None) -> SchedulerRecord:
    """The scheduler a job named `name` ran with: built the way the engine builds it."""
    from shared.engine.samplers import build_scheduler

    scheduler = build_scheduler(name, engine.scheduler_config)
    return SchedulerRecord(
        class_name=type(scheduler).__name__, config=json.loads(scheduler.to_json_string())
    )


@serve.deployment(name="SDXLPipeline")
class SDXLPipeline:
    # An async constructor (Serve awaits it): a replica takes traffic only once the engines of
    # the `preload: true` models are built and have run one step, so its first request is warm.
    async def __init__(self, config: AppConfig, cache: DeploymentHandle) -> None:  # type: ignore[misc]
        # torch and diffusers are imported here, in the replica, never where the app is built.
        from shared.engine.batcher import StepBatcher
        from shared.engine.build import build_engine
        from shared.engine.modules import pick_device

        self._config = config
        self._cache = cache
        self._build = build_engine
        self._device = pick_device(len(ray.get_gpu_ids()))
        batching = config.batching
        self._batcher = StepBatcher(
            max_batch_images=batching.max_batch_images,
            max_wait_ms=batching.max_wait_ms,
            enabled=batching.enabled,
            on_batch=self._observe_batch,
        )
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._engines: OrderedDict[str, SDXLEngine] = OrderedDict()  # built here, LRU order
        self._engine_lock = asyncio.Lock()
        self._steps = metrics.Counter("sdxl_steps", description="Denoising steps executed.")
        self._outcomes = metrics.Counter(
            "sdxl_jobs", description="Finished jobs by outcome.", tag_keys=("outcome",)
        )
        self._step_seconds = metrics.Histogram(
            "sdxl_step_seconds",
            description="Seconds per denoising step.",
            boundaries=[0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2],
        )
        self._batch_requests = metrics.Histogram(
            "sdxl_batch_requests",
            description="Requests sharing one UNet call.",
            boundaries=[1, 2, 4, 8, 16, 32],
        )
        self._batch_images = metrics.Histogram(
            "sdxl_batch_images",
            description="Images in one UNet call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self._queue_depth = metrics.Gauge(
            "sdxl_queue_depth", description="Requests waiting for room in the step batcher."
        )
        await self._preload()

    @serve.multiplexed(max_num_models_per_replica=ENTRIES_PER_REPLICA)
    async def get_engine(self, entry_id: str) -> _Entry:
        """Registers a multiplexed id (a model, or a model plus a LoRA set) with this replica, so
        Serve routes that id's next requests here: a LoRA set's requests meet where its adapters
        are already loaded. Entries own nothing; engines are per model (`_engine`)."""
        return _Entry(base_model(entry_id))

    async def _engine(self, model_id: str) -> SDXLEngine:
        """The model's engine, built on first use. At most MODELS_PER_REPLICA stay built: before
        building another, the least recently used one is released (requests still running on it
        finish on it), so the cache may evict its weights to make room for the new one."""
        async with self._engine_lock:
            if model_id in self._engines:
                self._engines.move_to_end(model_id)
                return self._engines[model_id]
            model = self._config.model(model_id)
            if model is None:
                raise GenerationError(f"model {model_id!r} is not served by this deployment")
            while len(self._engines) >= MODELS_PER_REPLICA:
                await self._drop_engine(next(iter(self._engines)))
            adapters = [lora.component for lora in model.loras]
            adapters += [controlnet.component for controlnet in model.controlnets]
            names = (*ENGINE_COMPONENTS, *adapters)
            components = await fetch_components(self._cache, model_id, names, _actor_name())
            fast_paths = self._config.engine.resolved(self._device)
            engine = await asyncio.to_thread(
                self._build, components, model.dtype, self._device, fast_paths
            )
            self._engines[model_id] = engine
            return engine

    async def _drop_engine(self, model_id: str) -> None:
        self._engines.pop(model_id, None)
        holder = _actor_name()
        if holder is None:
            return
        # Also called while the replica shuts down, when the app's cache may be gone first:
        # never hold up shutdown (the cache forgets dead holders by itself).
        try:
            await asyncio.wait_for(
                self._cache.release.remote(model_id, holder), timeout=RELEASE_TIMEOUT_S
            )
        except Exception as exc:
            logger.info("could not release %s in ModelCache: %r", model_id, exc)

    async def stream(self, job: DenoiseJob) -> AsyncIterator[PipelineEvent]:
        """Run one job: a QueuedEvent, a StepEvent per step, finally the ResultEvent."""
        await self.get_engine(multiplexed_id(job.model, job.loras))  # routing affinity
        engine = await self._engine(job.model)
        record = self._track(job.id)
        sink = _EventSink(asyncio.get_running_loop(), record, self._observe_step, job.stream_steps)
        self._batcher.submit(engine, job, sink)  # bad input raises here, before any event
        self._queue_depth.set(self._batcher.depth()[0])
        status = "cancelled"  # unless the loop below finishes or fails on its own
        try:
            while True:
                item = await sink.events.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, ResultEvent):
                    yield self._with_provenance(item, engine, job)
                    break
                yield item
            status = "done"
        except RequestCancelledError:
            raise
        except Exception:
            status = "failed"
            raise
        finally:
            sink.flag.set()
            if status == "cancelled" and self._batcher.withdraw(sink):
                self._queue_depth.set(self._batcher.depth()[0])
            record["status"] = status
            self._outcomes.inc(tags={"outcome": status})

    async def job_stats(self, job_id: str) -> dict[str, Any] | None:
        """Steps executed and outcome of a recent job on this replica (None if unknown)."""
        record = self._jobs.get(job_id)
        return dict(record) if record is not None else None

    async def replica_info(self) -> dict[str, Any]:
        """Where this replica runs and which models it has loaded now."""
        return {
            "replica": _replica_id(),
            "node_id": _node_id(),
            "pid": os.getpid(),
            "device": self._device,
            "models_built": sorted(self._engines),
        }

    async def ping(self) -> str:
        await self.check_health()
        return "ok"

    async def check_health(self) -> None:
        """Called by Serve every `health_check_period_s`: raising marks this replica unhealthy
        and Serve replaces it. It raises when the step batcher's thread died or is stuck."""
        problem = self._batcher.health()
        if problem is not None:
            logger.error("SDXLPipeline replica %s is unhealthy: %s", _replica_id(), problem)
            raise UnavailableError(problem)

    async def model_runtime(self, model_id: str, engine_facts: bool = True) -> dict[str, Any]:
        """How this replica runs `model_id`: `runtime` (device, GPU ids, UNet and VAE dtypes,
        whether built here) and, when `engine_facts` and it is built here, `engine`: what only
        the built engine shows (a 9-channel inpainting UNet, a tiny preview decoder). It reads
        the replica's engines directly: asking never loads a model nor counts as a use."""
        model = self._config.model(model_id)
        if model is None:
            raise GenerationError(f"model {model_id!r} is not served by this deployment")
        built = model_id in self._engines
        runtime = {
            "device": self._device,
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "dtype": model.dtype,
            "vae_dtype": "float32",  # build_engine decodes in float32 whatever the dtype
            "built": built,
        }
        engine = None
        if built and engine_facts:
            built_engine = self._engines[model_id]
            engine = {
                "inpainting_unet": built_engine.inpainting_unet,
                "tiny_preview": built_engine.previewers["tiny"] is not None,
            }
        return {"runtime": runtime, "engine": engine}

    async def estimate(
        self, model_id: str, width: int, height: int, steps: int, images: int
    ) -> dict[str, float | None]:
        """`queue_ms` and `run_ms` of a job of this shape on this replica now (see
        `StepBatcher.estimate`): null before this replica measured a step."""
        if self._config.model(model_id) is None:
            raise GenerationError(f"model {model_id!r} is not served by this deployment")
        return self._batcher.estimate(width, height, steps, images)

    async def _preload(self) -> None:
        preloaded = [m for m in self._config.models if m.preload][:MODELS_PER_REPLICA]
        for model in preloaded:
            try:
                await self.get_engine(model.id)
                engine = await self._engine(model.id)
                size = await self._cache.defaults.remote(model.id)
                width = model.default_width or size.get("width", 1024)
                height = model.default_height or size.get("height", 1024)
                await asyncio.to_thread(engine.warm_up, width, height)
            except Exception as exc:  # the model's failure is reported by ModelCache
                logger.warning("could not preload the engine of %s: %r", model.id, exc)

    def _observe_step(self, event: StepEvent) -> None:
        self._steps.inc()
        self._step_seconds.observe(event.step_ms / 1000)

    def _observe_batch(self, requests: int, images: int) -> None:
        self._batch_requests.observe(requests)
        self._batch_images.observe(images)
        self._queue_depth.set(self._batcher.depth()[0])

    def _with_provenance(
        self, result: ResultEvent, engine: SDXLEngine, job: DenoiseJob
    ) -> ResultEvent:
        """The result with what only the replica knows of how it was made: the scheduler and
        the library versions (the Router adds the request and the weights' digests)."""
        result.metadata = ResultMetadata(
            scheduler=_scheduler_record(engine, job.scheduler), versions=_library_versions()
        )
        return result

    def _track(self, job_id: str) -> dict[str, Any]:
        record = {
            "steps": 0,
            "status": "running",
            "replica": _replica_id(),
            "max_batch_requests": 0,
        }
        self._jobs[job_id] = record
        while len(self._jobs) > RECENT_JOBS:
            self._jobs.popitem(last=False)
        return record

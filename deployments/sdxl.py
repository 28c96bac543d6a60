"""SDXLPipeline: UNet + VAE on one GPU (or the CPU), multiplexed by model id, streaming steps.

The denoising loop runs in a worker thread; each step's event crosses back to the replica's event
loop with `call_soon_threadsafe`. When the caller goes away Serve cancels the generator at its
`await`, the `finally` sets the job's flag, and the loop stops before its next step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from deployments.model_cache import fetch_components
from shared.api.jobs import DenoiseJob
from shared.api.schemas import ResultEvent, StepEvent
from shared.config import AppConfig
from shared.errors import GenerationError, RequestCancelledError
from shared.weights.loader import ENGINE_COMPONENTS

if TYPE_CHECKING:
    from shared.engine.sdxl import SDXLEngine

logger = logging.getLogger("ray.serve")
RECENT_JOBS = 256
RELEASE_TIMEOUT_S = 2.0
_DONE = object()


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


@serve.deployment(name="SDXLPipeline")
class SDXLPipeline:
    def __init__(self, config: AppConfig, cache: DeploymentHandle) -> None:
        # torch and diffusers are imported here, in the replica, never where the app is built.
        from shared.engine.build import build_engine
        from shared.engine.modules import pick_device

        self._config = config
        self._cache = cache
        self._build = build_engine
        self._device = pick_device(len(ray.get_gpu_ids()))
        # One GPU job at a time per replica: concurrent jobs would only fight for the same SMs.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoise")
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._built: set[str] = set()  # models whose engine this replica has built
        self._steps = metrics.Counter("sdxl_steps", description="Denoising steps executed.")
        self._outcomes = metrics.Counter(
            "sdxl_jobs", description="Finished jobs by outcome.", tag_keys=("outcome",)
        )
        self._step_seconds = metrics.Histogram(
            "sdxl_step_seconds",
            description="Seconds per denoising step.",
            boundaries=[0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2],
        )

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_engine(self, model_id: str) -> SDXLEngine:
        model = self._config.model(model_id)
        if model is None:
            raise GenerationError(f"model {model_id!r} is not served by this deployment")
        holder = _actor_name()
        components = await fetch_components(self._cache, model_id, ENGINE_COMPONENTS, holder)
        engine = await asyncio.to_thread(self._build, components, model.dtype, self._device)
        self._built.add(model_id)

        async def unloaded() -> None:
            self._built.discard(model_id)
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

        # Serve calls a multiplexed model's `__del__` when it unloads it to make room for another.
        engine.__del__ = unloaded  # type: ignore[attr-defined]
        return engine

    async def stream(self, job: DenoiseJob) -> AsyncIterator[StepEvent | ResultEvent]:
        """Run one job, yielding a StepEvent per step and finally the ResultEvent."""
        engine = await self.get_engine(job.model)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()
        record = self._track(job.id)

        def emit(event: StepEvent) -> None:
            record["steps"] += 1
            self._steps.inc()
            self._step_seconds.observe(event.step_ms / 1000)
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def run() -> None:
            job.timings["queue_ms"] = (time.time() - job.created_at) * 1000
            try:
                outcome: Any = engine.run(job, emit, cancelled.is_set)
            except BaseException as exc:  # handed to the event loop and re-raised there
                outcome = exc
            loop.call_soon_threadsafe(queue.put_nowait, outcome)
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        loop.run_in_executor(self._executor, run)
        status = "cancelled"  # unless the loop below finishes or fails on its own
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
            status = "done"
        except RequestCancelledError:
            raise
        except Exception:
            status = "failed"
            raise
        finally:
            cancelled.set()
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
            "models_built": sorted(self._built),
        }

    async def ping(self) -> str:
        return "ok"

    def _track(self, job_id: str) -> dict[str, Any]:
        record = {"steps": 0, "status": "running", "replica": _replica_id()}
        self._jobs[job_id] = record
        while len(self._jobs) > RECENT_JOBS:
            self._jobs.popitem(last=False)
        return record

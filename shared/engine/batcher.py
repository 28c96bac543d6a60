"""StepBatcher: one denoising loop per replica that serves every request in flight.

Requests wait in a FIFO. At every step boundary the loop admits waiting requests while their
images fit `max_batch_images` (the head of the line always runs when nothing else does), drops
the cancelled ones, groups the rest by what lets them share a UNet call (engine — that is,
model —, size, UNet — the base or the model's refiner — and LoRA set; the dtype is the
engine's), runs one `SDXLEngine.step` per group,
then finishes the requests whose last step that was with one `SDXLEngine.decode` per group. A
request joins at the next boundary and starts at its own step 0; it leaves when done or
cancelled, and the others go on undisturbed. With batching off it admits one request at a time,
which is a plain FIFO of whole requests.

It runs in its own thread and talks to each request through a `Sink` (thread-safe on the
caller's side: the deployment hands events to its event loop with `call_soon_threadsafe`).
Nothing here knows about Ray.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from shared.api.jobs import DenoiseJob, LoraSet
from shared.api.schemas import QueuedEvent, ResultEvent, StepEvent
from shared.engine.sdxl import Denoising, SDXLEngine
from shared.errors import RequestCancelledError, ServeError, UnavailableError

logger = logging.getLogger(__name__)
GroupKey = tuple[int, tuple[tuple[int, int], str, LoraSet]]
# How much one new step time moves the estimate used for `queued` ETAs.
STEP_TIME_SMOOTHING = 0.3


class Sink(Protocol):
    """Where one request's events go; called from the batcher's thread, must not block."""

    def queued(self, event: QueuedEvent) -> None: ...

    def step(self, event: StepEvent, batch_requests: int) -> None: ...

    def finish(self, outcome: ResultEvent | BaseException) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass
class _Request:
    engine: SDXLEngine
    job: DenoiseJob
    sink: Sink
    submitted: float
    state: Denoising | None = None

    @property
    def images(self) -> int:
        return len(self.job.seeds)

    @property
    def steps_left(self) -> int:
        return self.state.total - self.state.done if self.state is not None else self.job.steps

    @property
    def key(self) -> GroupKey:
        """What lets requests share a UNet call: engine (model), size, UNet (base or refiner)
        and LoRA set (`Denoising.group`); only started requests are grouped."""
        assert self.state is not None
        return id(self.engine), self.state.group


@dataclass
class StepTimes:
    """Measured milliseconds per UNet step by output pixels, smoothed; the ETA's clock."""

    by_pixels: dict[int, float] = field(default_factory=dict)

    def record(self, pixels: int, ms: float) -> None:
        last = self.by_pixels.get(pixels)
        smoothed = ms if last is None else last + STEP_TIME_SMOOTHING * (ms - last)
        self.by_pixels[pixels] = smoothed

    def estimate(self, pixels: int) -> float | None:
        if pixels in self.by_pixels:
            return self.by_pixels[pixels]
        if not self.by_pixels:
            return None
        # The nearest measured size, scaled by pixel count (UNet cost grows with it).
        nearest = min(self.by_pixels, key=lambda p: abs(p - pixels))
        return self.by_pixels[nearest] * pixels / nearest


def _cancelled(request: _Request) -> RequestCancelledError:
    return RequestCancelledError(f"request {request.job.id} was cancelled")


class StepBatcher:
    """Continuous batching of denoising steps across requests (see the module docstring)."""

    def __init__(
        self,
        max_batch_images: int = 8,
        max_wait_ms: float = 0.0,
        enabled: bool = True,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_ms / 1000
        self.enabled = enabled
        self._on_batch = on_batch  # (requests, images) of every UNet call, for metrics
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._plan: list[tuple[int, int]] = []  # (images, steps left) of the active, for ETAs
        self._closed = False
        self.step_times = StepTimes()
        self._thread = threading.Thread(target=self._loop, name="step-batcher", daemon=True)
        self._thread.start()

    def submit(self, engine: SDXLEngine, job: DenoiseJob, sink: Sink) -> None:
        """Queue `job`; bad input raises here, before any event, and nothing is queued."""
        engine.check(job)
        with self._cond:
            if self._closed:
                raise UnavailableError("this replica is shutting down; retry")
            request = _Request(engine, job, sink, time.perf_counter())
            ahead = list(self._waiting)
            self._waiting.append(request)
            eta = self._eta(ahead, request)
            self._cond.notify()
        sink.queued(QueuedEvent(id=job.id, position=len(ahead), eta_ms=eta))

    def depth(self) -> tuple[int, int]:
        """(waiting, running) requests."""
        with self._cond:
            return len(self._waiting), len(self._active)

    def close(self) -> None:
        """Stop the loop; requests still queued or running fail as unavailable."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ---- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            admitted = self._next_admissions()
            if admitted is None:
                break
            try:
                self._iterate(admitted)
            except Exception:  # a bug must fail the requests in flight, never strand them
                logger.exception("the step batcher's loop failed; failing its requests")
                self._fail_running(ServeError("internal error in the step batcher"))
        self._fail_all(UnavailableError("this replica shut down before the request finished"))

    def _iterate(self, admitted: list[_Request]) -> None:
        self._start(admitted)
        self._drop_cancelled()
        self._step_groups()
        self._retire()
        with self._cond:
            self._plan = [(r.images, r.steps_left) for r in self._live()]

    def _next_admissions(self) -> list[_Request] | None:
        with self._cond:
            while not self._closed and not self._waiting and not self._active:
                self._cond.wait()
            if self._closed:
                return None
            if not self._active and self.max_wait_s > 0:
                # An idle loop may wait a moment for company; a busy one never waits.
                deadline = time.perf_counter() + self.max_wait_s
                while not self._closed and self._waiting_images() < self.max_batch_images:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            admitted = []
            while self._waiting and self._fits(self._waiting[0]):
                request = self._waiting.popleft()
                self._active.append(request)
                admitted.append(request)
            # Admitted requests leave the queue now; until this iteration ends and the plan is
            # rebuilt, ETAs must still see them as running, or a request queued meanwhile is
            # promised a slot they hold.
            self._plan = [*self._plan, *((r.images, r.job.steps) for r in admitted)]
            return admitted

    def _fits(self, request: _Request) -> bool:
        if not self._active:
            return True  # the head of the line always runs, whatever its size
        if not self.enabled:
            return False
        used = sum(r.images for r in self._active)
        return used + request.images <= self.max_batch_images

    def _waiting_images(self) -> int:
        return sum(r.images for r in self._waiting)

    def _start(self, admitted: list[_Request]) -> None:
        for request in admitted:
            job = request.job
            job.timings["queue_ms"] = max(0.0, (time.time() - job.created_at) * 1000)
            if request.sink.cancelled():  # gone while it waited: no slot, no setup
                self._finish(request, _cancelled(request))
                continue
            try:
                request.state = request.engine.prepare(job)
            except Exception as exc:
                self._finish(request, exc)

    def _drop_cancelled(self) -> None:
        for request in self._live():
            if request.sink.cancelled():
                self._finish(request, _cancelled(request))

    def _step_groups(self) -> None:
        groups: dict[GroupKey, list[_Request]] = {}
        for request in self._live():
            groups.setdefault(request.key, []).append(request)
        for members in groups.values():
            states = [r.state for r in members if r.state is not None]
            started = time.perf_counter()
            try:
                events = members[0].engine.step(states)
            except Exception as exc:  # the whole call failed: each of its requests is told
                logger.exception("a batched UNet step failed")
                for request in members:
                    self._finish(request, exc)
                continue
            height, width = members[0].job.height, members[0].job.width
            self.step_times.record(height * width, (time.perf_counter() - started) * 1000)
            if self._on_batch is not None:
                self._on_batch(len(members), sum(r.images for r in members))
            for request, event in zip(members, events, strict=True):
                request.sink.step(event, len(members))

    def _retire(self) -> None:
        done: dict[GroupKey, list[_Request]] = {}
        for request in self._live():
            if request.state is not None and request.state.finished:
                if request.sink.cancelled():
                    self._finish(request, _cancelled(request))
                else:
                    done.setdefault(request.key, []).append(request)
        for members in done.values():
            try:
                outcomes: list[ResultEvent | ServeError] = members[0].engine.decode(
                    [r.state for r in members if r.state is not None]
                )
            except Exception as exc:
                logger.exception("a batched decode failed")
                outcomes = [exc] * len(members)  # type: ignore[list-item]
            for request, outcome in zip(members, outcomes, strict=True):
                self._finish(request, outcome)

    def _live(self) -> list[_Request]:
        return [r for r in self._active if r.state is not None]

    def _finish(self, request: _Request, outcome: ResultEvent | BaseException) -> None:
        with self._cond:
            if request in self._active:
                self._active.remove(request)
        request.state = None
        request.sink.finish(outcome)

    def _fail_running(self, error: ServeError) -> None:
        with self._cond:
            running = list(self._active)
            self._active.clear()
        for request in running:
            request.sink.finish(error)

    def _fail_all(self, error: ServeError) -> None:
        with self._cond:
            stranded = [*self._active, *self._waiting]
            self._active.clear()
            self._waiting.clear()
        for request in stranded:
            request.sink.finish(error)

    # ---- ETA ----------------------------------------------------------------------------

    def estimate(self, width: int, height: int, steps: int, images: int) -> dict[str, float | None]:
        """What a request of this shape would wait for and run for if it came now: `queue_ms`
        until its first step (the queue played forward as for `queued` ETAs) and `run_ms`, its
        `steps` at the step time measured for its size. Both None until a step was measured."""
        step_ms = self._step_ms(width * height)
        if step_ms is None:
            return {"queue_ms": None, "run_ms": None}
        with self._cond:
            ahead = [(r.images, r.job.steps) for r in self._waiting]
            plan = list(self._plan)
        return {
            "queue_ms": self._steps_until_start(plan, ahead, images) * step_ms,
            "run_ms": steps * step_ms,
        }

    def _eta(self, ahead: list[_Request], request: _Request) -> float | None:
        """Milliseconds until `request` runs its first step: the queue played forward one step
        at a time with the measured step time (None until a step has been measured)."""
        step_ms = self._step_ms(request.job.height * request.job.width)
        if step_ms is None:
            return None
        queue = [(r.images, r.job.steps) for r in ahead]
        return self._steps_until_start(self._plan, queue, request.images) * step_ms

    def _step_ms(self, pixels: int) -> float | None:
        # A copy (one C call, atomic under the GIL): the loop's thread records step times into
        # the dict without the lock, and `estimate` iterates it.
        return StepTimes(dict(self.step_times.by_pixels)).estimate(pixels)

    def _steps_until_start(
        self, plan: list[tuple[int, int]], ahead: list[tuple[int, int]], images: int
    ) -> int:
        """Steps until a request of `images` images is admitted behind `ahead` ((images, steps)
        each), with `plan` ((images, steps left) each) running."""
        running = [list(item) for item in plan]
        queue = [*ahead, (images, -1)]
        steps = 0
        while True:
            while queue and self._would_fit(queue[0][0], running):
                admitted, left = queue.pop(0)
                if left == -1:
                    return steps
                running.append([admitted, left])
            for item in running:
                item[1] -= 1
            running = [item for item in running if item[1] > 0]
            steps += 1

    def _would_fit(self, images: int, running: list[list[int]]) -> bool:
        if not running:
            return True
        return self.enabled and sum(i for i, _ in running) + images <= self.max_batch_images

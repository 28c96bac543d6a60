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

A failure belongs to its request: a sink that raises, a sampler step, a preview or latents that
are not finite fail (or, for a preview, lose) only their own request, and a metric callback
that raises fails nobody. A UNet or VAE call that runs out of memory is retried in halves down
to one request, so only a request too large on its own fails; later UNet calls of that model,
size and UNet stay below the rows that ran out (the queue's image budget is unchanged: what
does not fit one call runs in several). Cancelled requests that still wait leave the queue at
once (`withdraw`) or at the next boundary, before any admission. `health` reports a loop whose
thread died or whose iteration has run too long, for the deployment's health check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shared.api.jobs import DenoiseJob, LoraSet
from shared.api.schemas import QueuedEvent, ResultEvent, StepEvent
from shared.engine.sdxl import Denoising, SDXLEngine
from shared.errors import GenerationError, RequestCancelledError, ServeError, UnavailableError

logger = logging.getLogger(__name__)
GroupKey = tuple[int, tuple[tuple[int, int], str, LoraSet]]
MemoryKey = tuple[int, tuple[int, int], str]
# How much one new step time moves the estimate used for `queued` ETAs.
STEP_TIME_SMOOTHING = 0.3
# An iteration (one step of every group, plus decodes) running longer than this is stuck.
STUCK_AFTER_S = 120.0


class Sink(Protocol):
    """Where one request's events go; called from the batcher's thread (`queued` and
    `finish` also from the caller's, under the batcher's lock for `queued`): must not block.
    `queued` is always the first event and `finish` the last."""

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


def _stop_reason(request: _Request) -> ServeError | None:
    """What to finish `request` with when its caller is gone, or None to go on. A sink that
    cannot say fails its own request."""
    try:
        gone = request.sink.cancelled()
    except Exception:
        logger.exception("the sink of request %s could not say if it was cancelled", request.job.id)
        return ServeError(f"internal error delivering the events of request {request.job.id}")
    return _cancelled(request) if gone else None


def _memory_key(request: _Request) -> MemoryKey:
    """What a UNet call's memory depends on besides its rows: the model, the size, the UNet."""
    assert request.state is not None
    return id(request.engine), request.state.size, request.state.stage


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def _too_large(request: _Request) -> GenerationError:
    job = request.job
    return GenerationError(
        f"request {job.id} ran out of accelerator memory even alone ({len(job.seeds)} images at "
        f"{job.width}x{job.height}); ask for fewer images or a smaller size",
        code="out_of_memory",
    )


def _release_cached_memory() -> None:
    # What the failed call allocated is garbage now; hand the cache back before the retry.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StepBatcher:
    """Continuous batching of denoising steps across requests (see the module docstring)."""

    def __init__(
        self,
        max_batch_images: int = 8,
        max_wait_ms: float = 0.0,
        enabled: bool = True,
        on_batch: Callable[[int, int], None] | None = None,
        stuck_after_s: float = STUCK_AFTER_S,
    ) -> None:
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_ms / 1000
        self.enabled = enabled
        self.stuck_after_s = stuck_after_s
        self._on_batch = on_batch  # (requests, images) of every UNet call, for metrics
        self._on_batch_failed = False  # logged once: a metric is never worth a log flood
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._plan: list[tuple[int, int]] = []  # (images, steps left) of the active, for ETAs
        self._closed = False
        self._death: str | None = None  # why the loop's thread ended, if not by `close`
        self._iteration_started: float | None = None  # perf_counter; None between iterations
        self._row_caps: dict[MemoryKey, int] = {}  # UNet rows per call, after out of memory
        self.step_times = StepTimes()
        self._thread = threading.Thread(target=self._loop, name="step-batcher", daemon=True)
        self._thread.start()

    def submit(self, engine: SDXLEngine, job: DenoiseJob, sink: Sink) -> None:
        """Queue `job`; bad input raises here, before any event, and nothing is queued. Its
        `queued` event is delivered before the loop can see it, so it always comes first; if
        the sink raises there, that raises here and nothing is queued."""
        engine.check(job)
        with self._cond:
            if self._closed:
                raise UnavailableError("this replica is shutting down; retry")
            if self._death is not None or not self._thread.is_alive():
                raise UnavailableError("this replica's step batcher stopped; retry elsewhere")
            request = _Request(engine, job, sink, time.perf_counter())
            ahead = list(self._waiting)
            eta = self._eta(ahead, request)
            sink.queued(QueuedEvent(id=job.id, position=len(ahead), eta_ms=eta))
            self._waiting.append(request)
            self._cond.notify()

    def withdraw(self, sink: Sink) -> bool:
        """Take the request that `sink` was submitted with out of the queue now (its caller
        went away) and finish it as cancelled, so it no longer counts toward positions, ETAs or
        the queue's depth. False when it is not waiting: a running request stops before its
        next step. By sink, not job id: ids come from callers and need not be unique."""
        with self._cond:
            gone = [r for r in self._waiting if r.sink is sink]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            self._deliver_finish(request, _cancelled(request))
        return bool(gone)

    def depth(self) -> tuple[int, int]:
        """(waiting, running) requests."""
        with self._cond:
            return len(self._waiting), len(self._active)

    def health(self) -> str | None:
        """None while the loop serves; otherwise what is wrong with it: its thread ended
        without `close`, or its current iteration has run longer than `stuck_after_s`."""
        with self._cond:
            closed, death = self._closed, self._death
        if not closed and (death is not None or not self._thread.is_alive()):
            return f"the step batcher's thread is dead: {death or 'it ended'}"
        started = self._iteration_started
        if started is not None:
            running = time.perf_counter() - started
            if running > self.stuck_after_s:
                return (
                    f"the step batcher is stuck: one iteration has run for {running:.0f} s "
                    f"(the bound is {self.stuck_after_s:g} s) with requests in flight"
                )
        return None

    def close(self) -> None:
        """Stop the loop; requests still queued or running fail as unavailable."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ---- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the thread ends here: `health` reports it, not silence
            logger.critical("the step batcher's thread died", exc_info=True)
            with self._cond:
                self._death = repr(exc)
        finally:
            self._iteration_started = None
            self._fail_all(UnavailableError("this replica shut down before the request finished"))

    def _serve(self) -> None:
        while True:
            admissions = self._next_admissions()
            if admissions is None:
                return
            admitted, withdrawn = admissions
            for request, reason in withdrawn:
                self._deliver_finish(request, reason)
            try:
                self._iterate(admitted)
            except Exception:  # a bug must fail the requests in flight, never strand them
                logger.exception("the step batcher's loop failed; failing its requests")
                self._fail_running(ServeError("internal error in the step batcher"))
            finally:
                self._iteration_started = None

    def _iterate(self, admitted: list[_Request]) -> None:
        self._start(admitted)
        self._drop_cancelled()
        self._step_groups()
        self._retire()
        with self._cond:
            self._plan = [(r.images, r.steps_left) for r in self._live()]

    def _next_admissions(
        self,
    ) -> tuple[list[_Request], list[tuple[_Request, ServeError]]] | None:
        """(admitted, withdrawn) at this boundary: the requests that join, and the cancelled
        ones that leave the queue without running, each with the error to finish it with
        (outside the lock)."""
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
            withdrawn = [(r, stop) for r in self._waiting if (stop := _stop_reason(r)) is not None]
            for request, _ in withdrawn:
                self._waiting.remove(request)
            admitted = []
            while self._waiting and self._fits(self._waiting[0]):
                request = self._waiting.popleft()
                self._active.append(request)
                admitted.append(request)
            # Admitted requests leave the queue now; until this iteration ends and the plan is
            # rebuilt, ETAs must still see them as running, or a request queued meanwhile is
            # promised a slot they hold.
            self._plan = [*self._plan, *((r.images, r.job.steps) for r in admitted)]
            self._iteration_started = time.perf_counter()
            return admitted, withdrawn

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
            stop = _stop_reason(request)
            if stop is not None:  # gone while it waited: no slot, no setup
                self._finish(request, stop)
                continue
            try:
                request.state = request.engine.prepare(job)
            except Exception as exc:
                self._finish(request, exc)

    def _drop_cancelled(self) -> None:
        for request in self._live():
            stop = _stop_reason(request)
            if stop is not None:
                self._finish(request, stop)

    def _step_groups(self) -> None:
        groups: dict[GroupKey, list[_Request]] = {}
        for request in self._live():
            groups.setdefault(request.key, []).append(request)
        for members in groups.values():
            for chunk in self._chunks(members):
                self._step(chunk)

    def _chunks(self, members: list[_Request]) -> list[list[_Request]]:
        """`members` in runs of at most the UNet rows that such a call was last found to fit
        (below the smallest that ran out of memory), so an out-of-memory call is not tried again
        at every step; all together while none has."""
        cap = self._row_caps.get(_memory_key(members[0]))
        if cap is None:
            return [members]
        chunks: list[list[_Request]] = [[]]
        rows = 0
        for request in members:
            own = request.state.rows if request.state is not None else 0
            if chunks[-1] and rows + own > cap:
                chunks.append([])
                rows = 0
            chunks[-1].append(request)
            rows += own
        return chunks

    def _step(self, members: list[_Request]) -> None:
        """One UNet call for `members`. Out of memory, it is retried in halves down to one
        request; `SDXLEngine.step` changes no state before its UNet call returns, so the retried
        states are still at the step that failed."""
        states = [r.state for r in members if r.state is not None]
        started = time.perf_counter()
        try:
            outcomes = members[0].engine.step(states)
        except Exception as exc:
            if _out_of_memory(exc):
                key, rows = _memory_key(members[0]), sum(state.rows for state in states)
                self._row_caps[key] = min(self._row_caps.get(key, rows), rows - 1)
                self._retry_halves(members, exc, self._step)
                return
            logger.exception("a batched UNet step failed")  # the whole call: each is told
            for request in members:
                self._finish(request, exc)
            return
        height, width = members[0].job.height, members[0].job.width
        self.step_times.record(height * width, (time.perf_counter() - started) * 1000)
        self._observe_batch(len(members), sum(r.images for r in members))
        for request, outcome in zip(members, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._finish(request, outcome)
            else:
                self._deliver_step(request, outcome, len(members))

    def _retry_halves(
        self,
        members: list[_Request],
        exc: BaseException,
        call: Callable[[list[_Request]], None],
    ) -> None:
        """`call` again on each half of `members` after an out-of-memory error; one request
        that runs out of memory alone fails."""
        _release_cached_memory()
        if len(members) == 1:
            logger.warning("request %s ran out of memory alone: %s", members[0].job.id, exc)
            self._finish(members[0], _too_large(members[0]))
            return
        logger.warning("a call for %d requests ran out of memory; retrying in halves", len(members))
        half = len(members) // 2
        call(members[:half])
        call(members[half:])

    def _retire(self) -> None:
        done: dict[GroupKey, list[_Request]] = {}
        for request in self._live():
            if request.state is not None and request.state.finished:
                stop = _stop_reason(request)
                if stop is not None:
                    self._finish(request, stop)
                else:
                    done.setdefault(request.key, []).append(request)
        for members in done.values():
            self._decode(members)

    def _decode(self, members: list[_Request]) -> None:
        """One VAE call for `members` (retried in halves when out of memory, as `_step`)."""
        try:
            outcomes: list[ResultEvent | ServeError] = members[0].engine.decode(
                [r.state for r in members if r.state is not None]
            )
        except Exception as exc:
            if _out_of_memory(exc):
                self._retry_halves(members, exc, self._decode)
                return
            logger.exception("a batched decode failed")
            outcomes = [exc] * len(members)  # type: ignore[list-item]
        for request, outcome in zip(members, outcomes, strict=True):
            self._finish(request, outcome)

    def _live(self) -> list[_Request]:
        return [r for r in self._active if r.state is not None]

    def _observe_batch(self, requests: int, images: int) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(requests, images)
        except Exception:  # a metric fails nobody
            if not self._on_batch_failed:
                self._on_batch_failed = True
                logger.exception("the step batcher's batch metric failed (logged once)")

    def _deliver_step(self, request: _Request, event: StepEvent, together: int) -> None:
        try:
            request.sink.step(event, together)
        except Exception:  # its own delivery failed: only this request fails
            logger.exception("could not deliver a step event of request %s", request.job.id)
            error = ServeError(f"internal error delivering the events of request {request.job.id}")
            self._finish(request, error)

    def _finish(self, request: _Request, outcome: ResultEvent | BaseException) -> None:
        with self._cond:
            if request in self._active:
                self._active.remove(request)
        request.state = None
        self._deliver_finish(request, outcome)

    def _deliver_finish(self, request: _Request, outcome: ResultEvent | BaseException) -> None:
        try:
            request.sink.finish(outcome)
        except Exception:  # nothing more to tell it; the others go on
            logger.exception("could not deliver the outcome of request %s", request.job.id)

    def _fail_running(self, error: ServeError) -> None:
        with self._cond:
            running = list(self._active)
            self._active.clear()
        for request in running:
            request.state = None
            self._deliver_finish(request, error)

    def _fail_all(self, error: ServeError) -> None:
        with self._cond:
            stranded = [*self._active, *self._waiting]
            self._active.clear()
            self._waiting.clear()
        for request in stranded:
            self._deliver_finish(request, error)

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

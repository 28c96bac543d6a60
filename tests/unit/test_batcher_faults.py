"""StepBatcher under faults, on the tiny model without Ray: a failure belongs to its request (a
request whose latents turn NaN, a preview that cannot be made, a sink or a metric that raises), a
cancelled request that still waits leaves the queue at once, `queued` always comes first, a UNet
call that runs out of memory is retried in halves, and `health` reports a dead or stuck loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.api.jobs import PromptEmbeddings
from shared.api.schemas import QueuedEvent, ResultEvent, StepEvent
from shared.engine.batcher import StepBatcher
from shared.engine.previews import to_pixels
from shared.engine.prompts import PromptEncoder
from shared.engine.sdxl import Denoising, SDXLEngine
from shared.errors import GenerationError, RequestCancelledError, ServeError, UnavailableError
from tests.unit.test_batcher import WAIT_S, RecordingSink, alone, job, max_difference
from tests.unit.test_engine import pixels

# Batched and alone differ by at most one level on CPU (as in test_batcher's mixed batch).
BATCH_TOLERANCE = 1


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> SDXLEngine:
    return SDXLEngine.from_pretrained_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def embeddings(tiny_model_dir: Path) -> list[PromptEmbeddings]:
    pairs = [("a photo of a cat", "blurry"), ("a red fox in the snow", None), ("a lighthouse", "")]
    encoded = PromptEncoder.from_pretrained_dir(tiny_model_dir).encode(pairs)
    assert all(isinstance(e, PromptEmbeddings) for e in encoded)
    return encoded  # type: ignore[return-value]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class LogSink(RecordingSink):
    """Also writes every event, with its request's name, to a log shared by several sinks."""

    def __init__(self, name: str, log: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name, self.log = name, log
        self.flag = threading.Event()

    def queued(self, event: QueuedEvent) -> None:
        self.log.append((self.name, "queued"))
        super().queued(event)

    def step(self, event: StepEvent, batch_requests: int) -> None:
        self.log.append((self.name, "step"))
        super().step(event, batch_requests)

    def finish(self, outcome: ResultEvent | BaseException) -> None:
        self.log.append((self.name, "finish"))
        super().finish(outcome)

    def cancelled(self) -> bool:
        return self.flag.is_set() or super().cancelled()


class GateSink(LogSink):
    """Holds the loop inside its first step event until released: the others stay queued."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        super().__init__(name, log)
        self.inside, self.release = threading.Event(), threading.Event()

    def step(self, event: StepEvent, batch_requests: int) -> None:
        super().step(event, batch_requests)
        self.inside.set()
        assert self.release.wait(WAIT_S)


class FaultySink(RecordingSink):
    """A sink whose `method` raises (after recording what it got)."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method

    def step(self, event: StepEvent, batch_requests: int) -> None:
        super().step(event, batch_requests)
        self._maybe_fail("step")

    def finish(self, outcome: ResultEvent | BaseException) -> None:
        super().finish(outcome)
        self._maybe_fail("finish")

    def cancelled(self) -> bool:
        self._maybe_fail("cancelled")
        return False

    def queued(self, event: QueuedEvent) -> None:
        self._maybe_fail("queued")
        super().queued(event)

    def _maybe_fail(self, method: str) -> None:
        if method == self.method:
            raise RuntimeError(f"the sink's {method} failed")


class WrappedEngine:
    """The tiny engine with its `step` replaced: a fault injected around the real one."""

    def __init__(self, engine: SDXLEngine, step: Callable[[list[Denoising]], list[Any]]) -> None:
        self._engine = engine
        self.step = step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class BrokenPreviewer:
    """A preview decoder whose output is NaN: `to_pixels` refuses it, as for an fp16 overflow."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        self.calls += 1
        return to_pixels(torch.full((latents.shape[0], 3, 8, 8), float("nan")))


@pytest.fixture
def broken_tiny_preview(engine: SDXLEngine) -> Iterator[BrokenPreviewer]:
    broken, saved = BrokenPreviewer(), engine.previewers["tiny"]
    engine.previewers["tiny"] = broken
    yield broken
    engine.previewers["tiny"] = saved


class OutOfMemoryAbove:
    """A UNet pre-hook that raises CUDA's out-of-memory error above `rows` rows and records the
    rows of every call tried, failed ones included."""

    def __init__(self, engine: SDXLEngine, rows: int) -> None:
        self.limit, self.tried = rows, []
        self._handle = engine.unet.register_forward_pre_hook(self._forward)

    def _forward(self, _module: object, args: tuple) -> None:
        rows = int(args[0].shape[0])
        self.tried.append(rows)
        if rows > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} rows")

    def close(self) -> None:
        self._handle.remove()


def together(batcher_kwargs: dict[str, Any] | None = None) -> StepBatcher:
    """A batcher whose idle loop waits for company: requests submitted at once start together."""
    # The wait ends as soon as the budget is filled; the bound only guards a slow machine.
    return StepBatcher(**{"max_batch_images": 4, "max_wait_ms": 10_000, **(batcher_kwargs or {})})


# ---- a failure belongs to its request ----------------------------------------------------


def test_nan_latents_fail_only_their_request(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    nan = np.full_like(embeddings[0].prompt_embeds, np.nan)
    poisoned = replace(embeddings[0], prompt_embeds=nan)
    sick = replace(job(embeddings, "sick", steps=4, preview="latent"), embeddings=poisoned)
    bystander = job(embeddings, "bystander", steps=4, seeds=[2])
    expected = alone(engine, bystander)
    batcher = together({"max_batch_images": 2})
    try:
        sinks = {r.id: RecordingSink() for r in (sick, bystander)}
        for request in (sick, bystander):
            batcher.submit(engine, request, sinks[request.id])
        result = sinks["bystander"].result()
        assert sinks["sick"].done.wait(WAIT_S)
    finally:
        batcher.close()
    failure = sinks["sick"].outcome
    assert isinstance(failure, GenerationError) and failure.code == "nan_output"
    assert "sick" in failure.message and sinks["sick"].steps == []  # failed at its first step
    assert [e.index for e in sinks["bystander"].steps] == [1, 2, 3, 4]
    assert sinks["bystander"].batch_requests == [2, 1, 1, 1]
    assert max_difference(pixels(result), expected) <= BATCH_TOLERANCE


def test_a_preview_that_cannot_be_made_is_dropped_and_logged_once(
    engine: SDXLEngine,
    embeddings: list[PromptEmbeddings],
    broken_tiny_preview: BrokenPreviewer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unlucky = job(embeddings, "unlucky", steps=4, preview="tiny", preview_every=1)
    bystander = job(embeddings, "latent-preview", steps=4, seeds=[2], preview="latent")
    expected = alone(engine, replace(unlucky, preview="none"))
    caplog.set_level(logging.WARNING, logger="shared.engine.sdxl")
    batcher = together({"max_batch_images": 2})
    try:
        sinks = {r.id: RecordingSink() for r in (unlucky, bystander)}
        for request in (unlucky, bystander):
            batcher.submit(engine, request, sinks[request.id])
        results = {name: sink.result() for name, sink in sinks.items()}
    finally:
        batcher.close()
    assert broken_tiny_preview.calls == 4  # tried at every step, dropped every time
    assert [len(e.previews) for e in sinks["unlucky"].steps] == [0, 0, 0, 0]
    assert [len(e.previews) for e in sinks["latent-preview"].steps] == [1, 1, 1, 1]
    assert sinks["unlucky"].batch_requests == [2, 2, 2, 2]  # nobody left the batch
    assert max_difference(pixels(results["unlucky"]), expected) <= BATCH_TOLERANCE
    dropped = [r for r in caplog.records if "dropped a preview" in r.getMessage()]
    assert len(dropped) == 1 and "unlucky" in dropped[0].getMessage()


@pytest.mark.parametrize("method", ["step", "cancelled", "finish"])
def test_a_sink_that_raises_fails_only_its_request(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings], method: str
) -> None:
    batcher = together({"max_batch_images": 2})
    try:
        faulty, bystander = FaultySink(method), RecordingSink()
        batcher.submit(engine, job(embeddings, "faulty", steps=3), faulty)
        batcher.submit(engine, job(embeddings, "bystander", steps=3, seeds=[2]), bystander)
        assert bystander.result().images
        assert faulty.done.wait(WAIT_S), "the faulty request was stranded"
        after = RecordingSink()
        batcher.submit(engine, job(embeddings, "after", steps=2), after)
        assert after.result().images  # the loop went on
    finally:
        batcher.close()
    assert [e.index for e in bystander.steps] == [1, 2, 3]
    if method == "finish":  # its delivery failed after its result: nothing else to tell it
        assert isinstance(faulty.outcome, ResultEvent)
        assert bystander.batch_requests == [2, 2, 2]
    elif method == "step":  # failed at its first step event
        assert isinstance(faulty.outcome, ServeError) and len(faulty.steps) == 1
        assert bystander.batch_requests == [2, 1, 1]
    else:  # it cannot say whether it is cancelled: it never starts
        assert isinstance(faulty.outcome, ServeError) and faulty.steps == []
        assert not isinstance(faulty.outcome, RequestCancelledError)
        assert "internal error delivering the events of request faulty" in str(faulty.outcome)
        assert bystander.batch_requests == [1, 1, 1]


def test_a_sink_whose_queued_raises_is_refused_and_nothing_is_queued(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    batcher = StepBatcher()
    try:
        with pytest.raises(RuntimeError, match="queued failed"):
            batcher.submit(engine, job(embeddings, "faulty"), FaultySink("queued"))
        assert batcher.depth() == (0, 0)
        after = RecordingSink()
        batcher.submit(engine, job(embeddings, "after", steps=2), after)
        assert after.result().images
    finally:
        batcher.close()


def test_a_metric_that_raises_fails_nobody_and_is_logged_once(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[int, int]] = []

    def broken_metric(requests: int, images: int) -> None:
        calls.append((requests, images))
        raise RuntimeError("the metrics backend is down")

    caplog.set_level(logging.ERROR, logger="shared.engine.batcher")
    batcher = together({"max_batch_images": 3, "on_batch": broken_metric})
    try:
        sinks = [RecordingSink() for _ in range(2)]
        batcher.submit(engine, job(embeddings, "one", steps=3, seeds=[1, 2]), sinks[0])
        batcher.submit(engine, job(embeddings, "two", steps=3, seeds=[3]), sinks[1])
        assert all(sink.result().images for sink in sinks)
    finally:
        batcher.close()
    assert calls == [(2, 3)] * 3
    assert sum("batch metric failed" in r.getMessage() for r in caplog.records) == 1


# ---- cancellation and event order -----------------------------------------------------


def test_a_withdrawn_request_leaves_the_queue_at_once(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    log: list[tuple[str, str]] = []
    batcher = StepBatcher(enabled=False)  # one request at a time: the others wait
    try:
        gate = GateSink("gate", log)
        batcher.submit(engine, job(embeddings, "gate", steps=2), gate)
        assert gate.inside.wait(WAIT_S)
        sinks = {name: LogSink(name, log) for name in ("b", "c", "d")}
        for name, sink in sinks.items():
            batcher.submit(engine, job(embeddings, name, steps=2), sink)
        assert batcher.depth() == (3, 1)
        assert batcher.withdraw(sinks["c"]) and not batcher.withdraw(gate)
        assert batcher.depth() == (2, 1)  # gone now, while the loop is still busy
        assert isinstance(sinks["c"].outcome, RequestCancelledError)
        late = LogSink("late", log)
        batcher.submit(engine, job(embeddings, "late", steps=2), late)
        assert late.queued_events[0].position == 2  # b and d ahead; c no longer counts
        gate.release.set()
        for sink in (*sinks.values(), late):
            assert sink.done.wait(WAIT_S)
    finally:
        batcher.close()
    assert sinks["c"].steps == [] and [e for n, e in log if n == "c"] == ["queued", "finish"]
    assert all(len(sinks[name].steps) == 2 for name in ("b", "d")) and len(late.steps) == 2


def test_a_cancelled_waiting_request_leaves_before_the_next_admission(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    log: list[tuple[str, str]] = []
    batcher = StepBatcher(enabled=False)
    try:
        gate = GateSink("gate", log)
        batcher.submit(engine, job(embeddings, "gate", steps=2), gate)
        assert gate.inside.wait(WAIT_S)
        sinks = {name: LogSink(name, log) for name in ("b", "c")}
        for name, sink in sinks.items():
            batcher.submit(engine, job(embeddings, name, steps=3), sink)
        sinks["c"].flag.set()  # its caller went away; nobody withdrew it
        gate.release.set()
        assert sinks["b"].done.wait(WAIT_S) and sinks["c"].done.wait(WAIT_S)
    finally:
        batcher.close()
    assert isinstance(sinks["c"].outcome, RequestCancelledError) and sinks["c"].steps == []
    # It left at the first boundary after the gate finished, before b (admitted there) stepped.
    assert log.index(("c", "finish")) < log.index(("b", "step"))
    assert len(sinks["b"].steps) == 3


def test_queued_is_always_the_first_event(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    log: list[tuple[str, str]] = []
    seen: dict[str, tuple[int, int]] = {}
    batcher = StepBatcher(max_batch_images=16)

    class DepthSink(LogSink):
        def queued(self, event: QueuedEvent) -> None:
            seen[self.name] = batcher.depth()  # what the loop could see at that moment
            super().queued(event)

    try:
        sinks = [DepthSink(f"r{i}", log) for i in range(8)]
        for i, sink in enumerate(sinks):
            batcher.submit(engine, job(embeddings, f"r{i}", steps=2, seeds=[i]), sink)
        for sink in sinks:
            sink.result()
    finally:
        batcher.close()
    assert seen["r0"] == (0, 0)  # delivered before the loop could admit it
    for i in range(8):
        events = [event for name, event in log if name == f"r{i}"]
        assert events == ["queued", "step", "step", "finish"]


# ---- out of memory ----------------------------------------------------------------------


def test_an_out_of_memory_unet_call_is_retried_in_halves_and_not_again(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    # Guidance on: 2 UNet rows per image. Above 4 rows the "GPU" runs out of memory.
    requests = [
        job(embeddings, "a", scheduler="euler_a", steps=3, seeds=[1]),
        job(embeddings, "b", prompt=1, scheduler="dpmpp_2m", steps=3, seeds=[2]),
        job(embeddings, "d", prompt=2, scheduler="euler_a", steps=3, seeds=[6]),
        job(embeddings, "c", prompt=2, steps=3, seeds=[3, 4, 5]),  # 6 rows: too large alone
    ]
    fitting = ("a", "b", "d")
    expected = {r.id: alone(engine, r) for r in requests if r.id in fitting}
    hook = OutOfMemoryAbove(engine, rows=4)
    batcher = together({"max_batch_images": 6})
    try:
        sinks = {r.id: RecordingSink() for r in requests}
        for request in requests:
            batcher.submit(engine, request, sinks[request.id])
        results = {name: sinks[name].result() for name in fitting}
        assert sinks["c"].done.wait(WAIT_S)
    finally:
        batcher.close()
        hook.close()
    # Step 1: all 12 rows fail → [a, b] run; [d, c] (8) fail → [d] runs; [c] (6) fails alone.
    # Steps 2 and 3: calls stay under the 6 rows that failed: [a, b] (4), then [d] (2).
    assert hook.tried == [12, 4, 8, 2, 6] + [4, 2] * 2
    failure = sinks["c"].outcome
    assert isinstance(failure, GenerationError) and failure.code == "out_of_memory"
    assert sinks["c"].steps == []
    assert {name: sinks[name].batch_requests for name in fitting} == {
        "a": [2, 2, 2],
        "b": [2, 2, 2],
        "d": [1, 1, 1],
    }
    for name in fitting:
        # Each ran each step once: a retried state was not advanced by the failed call.
        assert [e.index for e in sinks[name].steps] == [1, 2, 3]
        assert max_difference(pixels(results[name]), expected[name]) <= BATCH_TOLERANCE


# ---- watchdog ---------------------------------------------------------------------------


class LoopKiller(BaseException):
    """Escapes every `except Exception`: the loop's thread ends."""


def test_health_reports_a_dead_loop_and_fails_what_it_held(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings], caplog: pytest.LogCaptureFixture
) -> None:
    def killing_step(states: list[Denoising]) -> list[Any]:
        raise LoopKiller("the loop's thread is gone")

    batcher = StepBatcher()
    try:
        assert batcher.health() is None
        doomed = RecordingSink()
        batcher.submit(WrappedEngine(engine, killing_step), job(embeddings, "doomed"), doomed)
        assert doomed.done.wait(WAIT_S), "the dying loop stranded its request"
        assert isinstance(doomed.outcome, UnavailableError)
        wait_until(lambda: batcher.health() is not None, "the watchdog to see the dead thread")
        problem = batcher.health()
        assert problem is not None and "dead" in problem and "LoopKiller" in problem
        with pytest.raises(UnavailableError):
            batcher.submit(engine, job(embeddings, "after"), RecordingSink())
    finally:
        batcher.close()
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)


def test_health_reports_a_stuck_iteration_until_it_moves_again(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    inside, release = threading.Event(), threading.Event()

    def stuck_step(states: list[Denoising]) -> list[Any]:
        inside.set()
        assert release.wait(WAIT_S)
        return engine.step(states)

    batcher = StepBatcher(stuck_after_s=0.2)
    try:
        sink = RecordingSink()
        batcher.submit(WrappedEngine(engine, stuck_step), job(embeddings, "slow", steps=2), sink)
        assert inside.wait(WAIT_S)
        wait_until(lambda: batcher.health() is not None, "the watchdog to see the stuck step")
        problem = batcher.health()
        assert problem is not None and "stuck" in problem
        release.set()
        assert sink.result().images
        wait_until(lambda: batcher.health() is None, "the batcher to be healthy again")
    finally:
        batcher.close()
    assert batcher.health() is None  # closed on purpose: nothing to report

"""StepBatcher on the tiny model, without Ray: requests with different samplers, steps, seeds,
guidance and image counts, joining at different times, share UNet calls and still get exactly the
image they get alone; one request cancelled inside a batch runs exactly the steps it ran before
its flag while the others finish; a failing sink fails only its own request; batching off runs
one request at a time; `queued` events and the budget. Faults: tests/unit/test_batcher_faults.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared.api.jobs import DenoiseJob, PromptEmbeddings
from shared.api.schemas import QueuedEvent, ResultEvent, StepEvent
from shared.engine.batcher import StepBatcher
from shared.engine.prompts import PromptEncoder
from shared.engine.sdxl import SDXLEngine
from shared.errors import InvalidRequestError, RequestCancelledError, ServeError
from tests.unit.test_engine import pixels

WAIT_S = 120


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> SDXLEngine:
    return SDXLEngine.from_pretrained_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def embeddings(tiny_model_dir: Path) -> list[PromptEmbeddings]:
    encoder = PromptEncoder.from_pretrained_dir(tiny_model_dir)
    pairs = [("a photo of a cat", "blurry"), ("a red fox in the snow", None), ("a lighthouse", "")]
    encoded = encoder.encode(pairs)
    assert all(isinstance(e, PromptEmbeddings) for e in encoded)
    return encoded  # type: ignore[return-value]


def job(
    embeddings: list[PromptEmbeddings], name: str, prompt: int = 0, **fields: object
) -> DenoiseJob:
    base = DenoiseJob(
        id=name,
        model="tiny",
        embeddings=embeddings[prompt],
        width=64,
        height=64,
        steps=6,
        guidance_scale=5.0,
        seeds=[1],
    )
    return replace(base, **fields)  # type: ignore[arg-type]


class RecordingSink:
    """Collects one request's events; `cancel_after` steps it reports itself cancelled."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.queued_events: list[QueuedEvent] = []
        self.steps: list[StepEvent] = []
        self.batch_requests: list[int] = []
        self.outcome: ResultEvent | BaseException | None = None
        self.cancel_after = cancel_after
        self.done = threading.Event()

    def queued(self, event: QueuedEvent) -> None:
        self.queued_events.append(event)

    def step(self, event: StepEvent, batch_requests: int) -> None:
        self.steps.append(event)
        self.batch_requests.append(batch_requests)

    def finish(self, outcome: ResultEvent | BaseException) -> None:
        self.outcome = outcome
        self.done.set()

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.steps) >= self.cancel_after

    def result(self) -> ResultEvent:
        assert self.done.wait(WAIT_S), "the request never finished"
        assert isinstance(self.outcome, ResultEvent), self.outcome
        return self.outcome


class UNetBatches:
    """Rows of every UNet forward (a torch pre-hook): the batch compositions actually run."""

    def __init__(self, engine: SDXLEngine) -> None:
        self.rows: list[int] = []
        self._handle = engine.unet.register_forward_pre_hook(self._seen)

    def _seen(self, _module: object, args: tuple) -> None:
        self.rows.append(int(args[0].shape[0]))

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def unet_batches(engine: SDXLEngine) -> Iterator[UNetBatches]:
    batches = UNetBatches(engine)
    yield batches
    batches.close()


@pytest.fixture
def batcher() -> Iterator[StepBatcher]:
    batcher = StepBatcher(max_batch_images=16)
    yield batcher
    batcher.close()


def alone(engine: SDXLEngine, request: DenoiseJob) -> np.ndarray:
    return pixels(engine.run(request, lambda _: None, lambda: False))


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_a_mixed_batch_gives_every_request_its_own_image(
    engine: SDXLEngine,
    embeddings: list[PromptEmbeddings],
    batcher: StepBatcher,
    unet_batches: UNetBatches,
) -> None:
    first = [
        job(embeddings, "euler-cfg", scheduler="euler", steps=8, seeds=[1]),
        job(embeddings, "ancestral-no-cfg-n2", prompt=1, scheduler="euler_a",
            steps=6, seeds=[2, 3], guidance_scale=1.0),
    ]  # fmt: skip
    later = [
        job(embeddings, "dpm-karras", prompt=2, scheduler="dpmpp_2m_karras",
            steps=5, seeds=[4], guidance_scale=7.5),
        job(embeddings, "ddim", scheduler="ddim", steps=4, seeds=[5], guidance_scale=3.0),
        job(embeddings, "unipc-default-size", scheduler="unipc", steps=3, seeds=[6]),
        job(embeddings, "wide", scheduler="euler", steps=4, seeds=[7], width=96),
    ]  # fmt: skip
    expected = {request.id: alone(engine, request) for request in first + later}
    unet_batches.rows.clear()

    sinks = {request.id: RecordingSink() for request in first + later}
    for request in first:
        batcher.submit(engine, request, sinks[request.id])
    # The others join while the first two are mid-way: at their own step 0.
    deadline = threading.Event()
    while len(sinks["euler-cfg"].steps) < 2 and not deadline.wait(0.005):
        pass
    for request in later:
        batcher.submit(engine, request, sinks[request.id])

    differences = {}
    for request in first + later:
        result = sinks[request.id].result()
        differences[request.id] = max_difference(pixels(result), expected[request.id])
        steps = sinks[request.id].steps
        assert [e.index for e in steps] == list(range(1, request.steps + 1))
    assert max(differences.values()) <= 1, differences
    assert max(max(s.batch_requests) for s in sinks.values()) >= 4  # they really shared calls
    # One UNet call per group per boundary, not one per request per step.
    total_steps = sum(r.steps for r in first + later)
    assert len(unet_batches.rows) < total_steps
    assert max(unet_batches.rows) >= 6  # several requests' rows in one forward


def test_one_cancelled_request_leaves_the_batch_undisturbed(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    # An idle loop that waits a moment for company: all four start at the same boundary.
    batcher = StepBatcher(max_batch_images=4, max_wait_ms=2000)
    requests = [
        job(embeddings, f"r{i}", scheduler=s, steps=10, seeds=[20 + i])
        for i, s in enumerate(["euler", "euler_a", "dpmpp_2m", "euler"])
    ]
    expected = {r.id: alone(engine, r) for r in requests}
    sinks = {r.id: RecordingSink(cancel_after=2 if r.id == "r1" else None) for r in requests}
    try:
        for request in requests:
            batcher.submit(engine, request, sinks[request.id])
        for sink in sinks.values():
            assert sink.done.wait(WAIT_S)
    finally:
        batcher.close()

    cancelled = sinks["r1"]
    assert cancelled.done.wait(WAIT_S)
    assert isinstance(cancelled.outcome, RequestCancelledError)
    assert len(cancelled.steps) == 2  # exactly the steps it ran before its flag
    for request in requests:
        if request.id != "r1":
            result = sinks[request.id].result()
            assert max_difference(pixels(result), expected[request.id]) <= 1
            assert len(sinks[request.id].steps) == 10
            together = sinks[request.id].batch_requests
            assert together == [4, 4] + [3] * 8  # the cancelled one left after its 2 steps


def test_batching_off_runs_one_request_at_a_time(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings], unet_batches: UNetBatches
) -> None:
    requests = [job(embeddings, f"solo{i}", steps=3, seeds=[30 + i]) for i in range(3)]
    batcher = StepBatcher(enabled=False)
    try:
        sinks = [RecordingSink() for _ in requests]
        for request, sink in zip(requests, sinks, strict=True):
            batcher.submit(engine, request, sink)
        results = [sink.result() for sink in sinks]
    finally:
        batcher.close()
    assert all(set(sink.batch_requests) == {1} for sink in sinks)
    assert unet_batches.rows == [2] * 9  # one request (CFG: 2 rows) per call, 3 steps each
    assert all(len(sink.queued_events) == 1 for sink in sinks)
    for request, result in zip(requests, results, strict=True):
        assert max_difference(pixels(result), alone(engine, request)) == 0


def test_the_image_budget_bounds_a_batch_and_queued_events_carry_an_eta(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    batcher = StepBatcher(max_batch_images=2)
    try:
        warm = RecordingSink()  # a measured step time makes the ETAs concrete
        batcher.submit(engine, job(embeddings, "warm", steps=2), warm)
        warm.result()
        sinks = [RecordingSink() for _ in range(4)]
        for i, sink in enumerate(sinks):
            batcher.submit(engine, job(embeddings, f"b{i}", steps=4, seeds=[40 + i]), sink)
        for sink in sinks:
            sink.result()
    finally:
        batcher.close()
    assert max(max(sink.batch_requests) for sink in sinks) == 2
    etas = [sink.queued_events[0].eta_ms for sink in sinks]
    assert all(eta is not None for eta in etas)
    assert etas[3] > etas[1] >= 0  # the fourth waits for the first two to finish
    assert sinks[3].result().timings.queue_ms >= sinks[0].result().timings.queue_ms


def test_bad_input_is_refused_before_anything_is_queued(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings], batcher: StepBatcher
) -> None:
    sink = RecordingSink()
    with pytest.raises(InvalidRequestError) as caught:
        batcher.submit(engine, job(embeddings, "bad", width=60), sink)
    assert caught.value.param == "width"
    assert sink.queued_events == [] and batcher.depth() == (0, 0)


class BrokenSink(RecordingSink):
    """A sink whose step hook raises: a bug on the delivery side."""

    def step(self, event: StepEvent, batch_requests: int) -> None:
        raise RuntimeError("delivery failed")


def test_a_failing_sink_fails_only_its_request_and_the_loop_goes_on(
    engine: SDXLEngine, embeddings: list[PromptEmbeddings]
) -> None:
    batcher = StepBatcher(max_batch_images=2, max_wait_ms=2000)  # both start together
    try:
        broken, bystander = BrokenSink(), RecordingSink()
        batcher.submit(engine, job(embeddings, "broken", steps=3), broken)
        batcher.submit(engine, job(embeddings, "bystander", steps=3, seeds=[2]), bystander)
        assert broken.done.wait(WAIT_S), "a request was stranded"
        assert isinstance(broken.outcome, ServeError)
        assert "broken" in str(broken.outcome)
        assert bystander.result().images
        assert [e.index for e in bystander.steps] == [1, 2, 3]
        assert bystander.batch_requests == [2, 1, 1]  # they shared the first step only
        after = RecordingSink()
        batcher.submit(engine, job(embeddings, "after", steps=2), after)
        assert after.result().images  # the loop survived
    finally:
        batcher.close()

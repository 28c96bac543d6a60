"""Step-level batching through Serve: concurrent requests on the default app's one SDXLPipeline
replica share UNet calls (HTTP streams and the handle API alike) and each still gets the image it
gets alone; a request that disconnects mid-batch stops within two steps while the others finish;
every stream starts with a `queued` event; and `batching.enabled: false` runs one at a time."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from tests.serve.conftest import APP_NAME
from tests.serve.harness import app_args, deploy, wait_for
from tests.serve.test_http import decode

MIXED = [
    {"scheduler": "euler", "steps": 12, "seed": 1},
    {"scheduler": "euler_a", "steps": 9, "seed": 2, "guidance_scale": 1.0},
    {"scheduler": "dpmpp_2m_karras", "steps": 10, "seed": 3, "n": 2},
    {"scheduler": "ddim", "steps": 8, "seed": 4, "guidance_scale": 7.5},
]
BASE = {"model": "tiny", "prompt": "a lighthouse at dusk", "width": 128, "height": 128}
OFF_APP = "batching-off"


def job_stats(job_id: str, app: str = APP_NAME) -> dict[str, Any] | None:
    from ray import serve

    pipeline = serve.get_deployment_handle("SDXLPipeline", app_name=app)
    return pipeline.job_stats.remote(job_id).result(timeout_s=30)


def finished(job_id: str, app: str = APP_NAME) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        stats = job_stats(job_id, app)
        return stats if stats is not None and stats["status"] != "running" else None

    return wait_for(done, 120, f"job {job_id} to finish")


def stream(url: str, body: dict[str, Any], job_id: str) -> list[dict[str, Any]]:
    with (
        httpx.Client(base_url=url, timeout=120) as http,
        http.stream(
            "POST", "/v1/generate", json={**body, "stream": True}, headers={"x-request-id": job_id}
        ) as response,
    ):
        assert response.status_code == 200, response.read()
        return [json.loads(line) for line in response.iter_lines() if line]


def image_pixels(result: dict[str, Any]) -> np.ndarray:
    return np.stack([np.asarray(decode(image["b64"])).astype(int) for image in result["images"]])


@pytest.fixture(scope="module")
def alone(app_url: str) -> list[np.ndarray]:
    """Each mixed request run by itself, one after the other."""
    return [
        image_pixels(
            httpx.post(f"{app_url}/v1/generate", json={**BASE, **fields}, timeout=120).json()
        )
        for fields in MIXED
    ]


def test_concurrent_http_streams_share_unet_calls_and_keep_their_pixels(
    app_url: str, alone: list[np.ndarray]
) -> None:
    ids = [f"mix-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(MIXED))]
    with ThreadPoolExecutor(len(MIXED)) as pool:
        streams = list(
            pool.map(lambda i: stream(app_url, {**BASE, **MIXED[i]}, ids[i]), range(len(MIXED)))
        )
    for fields, events, expected, job_id in zip(MIXED, streams, alone, ids, strict=True):
        assert events[0]["event"] == "queued" and events[0]["position"] >= 0
        assert [e["index"] for e in events if e["event"] == "step"] == list(
            range(1, fields["steps"] + 1)
        )
        result = events[-1]
        assert result["event"] == "result", result
        assert result["timings"]["queue_ms"] >= 0
        assert np.abs(image_pixels(result) - expected).max() <= 1
        assert finished(job_id)["steps"] == fields["steps"]
    batched = [finished(job_id)["max_batch_requests"] for job_id in ids]
    assert max(batched) >= 2, batched  # they really ran in shared UNet calls


def test_concurrent_handle_streams_are_batched_too(app_url: str, alone: list[np.ndarray]) -> None:
    from ray import serve

    from shared.api.schemas import GenerateRequest, ResultEvent

    router = serve.get_app_handle(APP_NAME)

    def run(fields: dict[str, Any]) -> list[Any]:
        request = GenerateRequest(**{**BASE, **fields})
        return list(router.options(stream=True).stream.remote(request))

    with ThreadPoolExecutor(len(MIXED)) as pool:
        streams = list(pool.map(run, MIXED))
    for events, expected in zip(streams, alone, strict=True):
        assert events[0].event == "queued"
        result = events[-1]
        assert isinstance(result, ResultEvent)
        assert np.abs(image_pixels(result.model_dump()) - expected).max() <= 1
        assert job_stats(result.id) is not None


def test_a_disconnect_inside_a_batch_stops_only_that_request(app_url: str) -> None:
    body = {**BASE, "steps": 40, "width": 256, "height": 256}
    ids = [f"cancel-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    leaver_at: dict[str, int] = {}
    started = threading.Barrier(4, timeout=60)

    def leave_after_two_steps() -> None:
        with (
            httpx.Client(base_url=app_url, timeout=120) as http,
            http.stream(
                "POST",
                "/v1/generate",
                json={**body, "seed": 100, "stream": True},
                headers={"x-request-id": ids[0]},
            ) as response,
        ):
            started.wait()
            steps = 0
            for line in response.iter_lines():
                if line and json.loads(line)["event"] == "step":
                    steps += 1
                    if steps == 2:
                        leaver_at["steps"] = job_stats(ids[0])["steps"]
                        return

    def stay(i: int) -> list[dict[str, Any]]:
        started.wait()
        return stream(app_url, {**body, "seed": 100 + i}, ids[i])

    with ThreadPoolExecutor(4) as pool:
        leaver = pool.submit(leave_after_two_steps)
        stayers = [pool.submit(stay, i) for i in range(1, 4)]
        leaver.result(timeout=120)
        results = [future.result(timeout=180) for future in stayers]
    left = finished(ids[0])
    assert left["status"] == "cancelled"
    assert left["steps"] <= leaver_at["steps"] + 2, (leaver_at, left)
    for i, events in enumerate(results, start=1):
        assert events[-1]["event"] == "result"
        assert finished(ids[i])["steps"] == 40
    assert max(finished(job_id)["max_batch_requests"] for job_id in ids) >= 2
    # The ones that stayed got the pixels they get alone.
    solo = httpx.post(f"{app_url}/v1/generate", json={**body, "seed": 101}, timeout=120).json()
    assert np.abs(image_pixels(results[0][-1]) - image_pixels(solo)).max() <= 1


@pytest.fixture(scope="module")
def unbatched(app_url: str, tiny_model_dir: Any) -> Iterator[Any]:
    from ray import serve

    args = app_args([{"id": "tiny", "source": str(tiny_model_dir)}])
    args["batching"] = {"enabled": False}
    router = deploy(OFF_APP, args)
    try:
        yield router
    finally:
        serve.delete(OFF_APP)


def test_batching_off_runs_one_request_at_a_time(unbatched: Any) -> None:
    from shared.api.schemas import GenerateRequest

    def run(seed: int) -> Any:
        request = GenerateRequest(model="tiny", prompt="a cat", steps=4, seed=seed)
        return list(unbatched.options(stream=True).stream.remote(request))

    with ThreadPoolExecutor(3) as pool:
        streams = list(pool.map(run, [1, 2, 3]))
    ids = [events[-1].id for events in streams]
    assert all(events[-1].event == "result" for events in streams)
    assert [finished(job_id, OFF_APP)["max_batch_requests"] for job_id in ids] == [1, 1, 1]


def test_a_job_nobody_streams_sends_no_step_events(app_url: str) -> None:
    import time

    from ray import serve

    from shared.api.jobs import DenoiseJob

    encoder = serve.get_deployment_handle("ClipEncoder", app_name=APP_NAME)
    embeddings = encoder.encode.remote("tiny", "a quiet harbour", None).result(timeout_s=60)
    job = DenoiseJob(
        id=f"quiet-{uuid.uuid4().hex[:6]}",
        model="tiny",
        embeddings=embeddings,
        width=64,
        height=64,
        steps=3,
        guidance_scale=5.0,
        seeds=[1],
        stream_steps=False,
        created_at=time.time(),
    )
    pipeline = serve.get_deployment_handle("SDXLPipeline", app_name=APP_NAME)
    stream = pipeline.options(stream=True, multiplexed_model_id="tiny").stream.remote(job)
    assert [event.event for event in stream] == ["queued", "result"]
    assert finished(job.id)["steps"] == 3  # the steps ran; only their events stayed home

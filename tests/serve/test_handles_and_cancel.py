"""The Python handle API from a second Serve app, and cancellation when the client goes away."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from tests.serve.conftest import APP_NAME
from tests.serve.test_http import BASE, decode, pixels


@pytest.fixture(scope="module")
def handle_client(app_url: str):
    from ray import serve

    from tests.serve.handle_client import HandleClient

    return serve.run(HandleClient.bind(APP_NAME), name="handle-client", route_prefix=None)


def test_handle_generate_from_another_app_matches_http(handle_client, client) -> None:
    request = {**BASE, "seed": 11}
    via_handle = handle_client.unary.remote(request).result(timeout_s=120)
    via_http = client.post("/v1/generate", json=request).json()
    assert via_handle["backend"] == "local" and via_handle["images"][0]["seed"] == 11
    assert np.array_equal(pixels(via_handle), pixels(via_http))


def test_handle_stream_yields_the_same_event_models(handle_client) -> None:
    events = handle_client.streamed.remote({**BASE, "seed": 5, "preview": "latent"}).result(
        timeout_s=120
    )
    assert [e["event"] for e in events] == ["queued"] + ["step"] * 4 + ["result"]
    assert [e["index"] for e in events[1:5]] == [1, 2, 3, 4]
    assert events[1]["previews"] and decode(events[-1]["images"][0]["b64"]).size == (64, 64)


def test_handle_errors_are_typed(handle_client) -> None:
    error = handle_client.failing.remote({**BASE, "steps": 1000}).result(timeout_s=60)
    assert error["invalid_request"] is True and error["status"] == 422
    assert error["param"] == "steps"
    streamed = handle_client.streamed.remote({**BASE, "model": "nope"}).result(timeout_s=60)
    assert streamed[-1]["event"] == "error" and streamed[-1]["error"]["code"] == "model_not_found"


def job_stats(job_id: str) -> dict | None:
    from ray import serve

    pipeline = serve.get_deployment_handle("SDXLPipeline", app_name=APP_NAME)
    return pipeline.job_stats.remote(job_id).result(timeout_s=30)


def wait_finished(job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = job_stats(job_id)
        if stats is not None and stats["status"] != "running":
            return stats
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} still running: {job_stats(job_id)}")


def test_disconnect_mid_stream_stops_the_denoising_loop(app_url: str) -> None:
    # Big enough that a step takes tens of milliseconds on CPU, so "two steps" is a real bound.
    request = {
        **BASE,
        "width": 512,
        "height": 512,
        "steps": 100,
        "stream": True,
        "preview": "full",
        "seed": 9,
    }
    with (
        httpx.Client(base_url=app_url, timeout=60) as http,
        http.stream("POST", "/v1/generate", json=request) as response,
    ):
        lines = response.iter_lines()
        queued = json.loads(next(lines))
        assert queued["event"] == "queued"
        json.loads(next(lines))
        second = json.loads(next(lines))
        job_id = queued["id"]
        at_disconnect = job_stats(job_id)["steps"]
    stats = wait_finished(job_id)
    assert second["index"] == 2
    assert stats["status"] == "cancelled"
    assert stats["steps"] <= at_disconnect + 2, (at_disconnect, stats)
    assert stats["steps"] < 100


def test_finished_jobs_report_done(client) -> None:
    response = client.post(
        "/v1/generate", json={**BASE, "seed": 1}, headers={"x-request-id": "job-done-check"}
    )
    # Serve echoes the caller's request id, and the job carries the same id.
    assert response.headers["x-request-id"] == "job-done-check"
    assert response.json()["id"] == "job-done-check"
    stats = wait_finished("job-done-check")
    assert stats == {**stats, "status": "done", "steps": 4}

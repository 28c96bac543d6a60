"""Cloud providers through Ray Serve: routing by `provider/model`, streaming partial images as
step events, the handle API, and spill-over from a busy local pipeline. The providers are the
loopback fakes of tests/fakes, speaking each provider's real protocol."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import FAKE_KEYS
from tests.fakes import FakeProvider, start_fake
from tests.serve.harness import default_app_args

APP = "diffusion-cloud"


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProvider]]:
    openai = start_fake(
        "openai",
        api_key=FAKE_KEYS["DS_TEST_OPENAI_KEY"],
        api_key_env="DS_TEST_OPENAI_KEY",
        stream_interval_s=0.05,
    )
    runware = start_fake(
        "runware", api_key=FAKE_KEYS["DS_TEST_RUNWARE_KEY"], api_key_env="DS_TEST_RUNWARE_KEY"
    )
    yield {"openai": openai, "runware": runware}
    openai.stop()
    runware.stop()


@pytest.fixture(scope="module")
def cloud_url(app_url: str, fakes: dict[str, FakeProvider]) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_app

    args = default_app_args()
    args["models"][0]["fallback"] = "runware/" + fakes["runware"].served_models()[0]
    args["providers"] = [fakes["openai"].config(), fakes["runware"].config()]
    pipeline = args["pipeline_deployment"]
    pipeline.pop("autoscaling")
    pipeline.update(num_replicas=1, max_ongoing_requests=1, max_queued_requests=1)
    serve.run(build_app(args), name=APP, route_prefix="/cloud")
    yield f"{app_url}/cloud"
    serve.delete(APP)


def test_provider_model_via_http_json(cloud_url: str, fakes: dict[str, FakeProvider]) -> None:
    before = len(fakes["openai"].calls_to("/v1/images/generations"))
    body = {"model": "openai/gpt-image-1", "prompt": "a red fox", "width": 1024, "height": 1024}
    response = httpx.post(f"{cloud_url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["backend"] == "openai" and result["model"] == "openai/gpt-image-1"
    assert result["images"][0]["b64"] and result["spilled_over"] is False
    assert len(fakes["openai"].calls_to("/v1/images/generations")) == before + 1


def test_openai_partial_images_stream_as_step_events(cloud_url: str) -> None:
    body = {
        "model": "openai/gpt-image-1",
        "prompt": "a red fox",
        "stream": True,
        "preview": "full",
        "width": 1024,
        "height": 1024,
    }
    with httpx.stream("POST", f"{cloud_url}/v1/generate", json=body, timeout=60) as response:
        events = [json.loads(line) for line in response.iter_lines() if line]
    steps = [e for e in events if e["event"] == "step"]
    assert steps and all(step["previews"] for step in steps)
    assert events[-1]["event"] == "result" and events[-1]["backend"] == "openai"


def test_models_list_includes_providers(cloud_url: str) -> None:
    models = httpx.get(f"{cloud_url}/v1/models", timeout=30).json()["data"]
    by_id = {m["id"]: m for m in models}
    assert by_id["openai/gpt-image-1"]["backend"] == "openai"
    assert by_id["openai/gpt-image-1"]["state"]["breaker"] == "closed"
    ready = httpx.get(f"{cloud_url}/readyz", timeout=30).json()
    assert ready["providers"] == {"openai": "closed", "runware": "closed"}


def test_unknown_provider_model_is_404(cloud_url: str) -> None:
    response = httpx.post(
        f"{cloud_url}/v1/generate", timeout=30, json={"model": "openai/nope", "prompt": "a"}
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "openai/gpt-image-1" in response.json()["error"]["message"]


def test_provider_via_handle() -> None:
    from ray import serve

    from shared.api.schemas import GenerateRequest

    handle = serve.get_app_handle(APP)
    request = GenerateRequest(model="openai/dall-e-3", prompt="a fox", width=1024, height=1024)
    response = handle.generate.remote(request).result(timeout_s=60)
    assert response.backend == "openai" and len(response.images) == 1


def test_spill_over_when_local_queue_is_full(
    cloud_url: str, fakes: dict[str, FakeProvider]
) -> None:
    slow = {
        "model": "tiny",
        "prompt": "a cat",
        "width": 512,
        "height": 512,
        "steps": 80,
        "stream": True,
        "preview": "full",
    }
    first_step = threading.Event()
    done = threading.Event()

    def occupy(signal: threading.Event | None) -> None:
        with httpx.stream("POST", f"{cloud_url}/v1/generate", json=slow, timeout=120) as r:
            for _ in r.iter_lines():
                if signal is not None:
                    signal.set()
                if done.is_set():
                    return

    # One slow stream holds the replica's only slot; of four concurrent requests at most one
    # fits the only queue place, and the others must spill over instead of waiting.
    running = threading.Thread(target=occupy, args=(first_step,))
    running.start()
    before = len(fakes["runware"].calls_to("/v1"))
    try:
        assert first_step.wait(timeout=60)
        small = {"model": "tiny", "prompt": "a cat", "seed": 1, "width": 128, "height": 128}
        with ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(
                    lambda _: httpx.post(f"{cloud_url}/v1/generate", json=small, timeout=120),
                    range(4),
                )
            )
    finally:
        done.set()
        running.join(timeout=120)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    results = [r.json() for r in responses]
    spilled = [r for r in results if r["spilled_over"]]
    assert len(spilled) >= 3
    assert all(r["backend"] == "runware" and r["model"] == "tiny" for r in spilled)
    assert all(r["backend"] == "local" for r in results if not r["spilled_over"])
    assert len(fakes["runware"].calls_to("/v1")) == before + len(spilled)

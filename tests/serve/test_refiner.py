"""The refiner on the default app (`tiny` with `tiny-refiner`): the same image over HTTP JSON, the
NDJSON stream and the handle API, one step stream across both stages, refined and plain requests
together each getting their own image, and requests the refiner cannot serve refused."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import numpy as np

from tests.serve.test_batching import finished, image_pixels, stream
from tests.serve.test_handles_and_cancel import handle_client  # noqa: F401 (a fixture)
from tests.serve.test_image_inputs import INIT, MASK, concurrently_as_alone, post

BASE = {"model": "tiny", "prompt": "a lighthouse at dusk", "steps": 8, "seed": 6}
REFINED = {**BASE, "refiner": {"model": "tiny-refiner", "switch_at": 0.7}}


def test_refiner_over_json_stream_and_handle(
    client: httpx.Client,
    app_url: str,
    handle_client: Any,  # noqa: F811
) -> None:
    job_id = f"refiner-{uuid.uuid4().hex[:8]}"
    via_json = post(client, REFINED, job_id)
    assert finished(job_id)["steps"] == 8  # both stages' steps, counted as one run
    events = stream(app_url, REFINED, f"{job_id}-s")
    steps = [e for e in events if e["event"] == "step"]
    assert [e["index"] for e in steps] == list(range(1, 9))
    assert {e["total"] for e in steps} == {8}
    via_handle = handle_client.unary.remote(REFINED).result(timeout_s=120)
    assert np.array_equal(image_pixels(via_json), image_pixels(events[-1]))
    assert np.array_equal(image_pixels(via_json), image_pixels(via_handle))
    assert not np.array_equal(image_pixels(via_json), image_pixels(post(client, BASE)))
    defaults = post(client, {**BASE, "refiner": {}})  # the model's refiner at its switch_at
    resolved = defaults["metadata"]["request"]
    assert resolved["refiner"] == {
        "model": "tiny-refiner",
        "switch_at": 0.8,
        "aesthetic_score": 6.0,
        "negative_aesthetic_score": 2.5,
    }
    again = post(client, resolved)
    assert np.array_equal(image_pixels(again), image_pixels(defaults))
    digests = defaults["metadata"]["components"]
    assert "refiner/unet/diffusion_pytorch_model.safetensors" in digests["refiner_unet"]
    assert "controlnet:tiny-canny/config.json" in digests["controlnet:tiny-canny"]


def test_refined_and_plain_requests_together_match_alone(client: httpx.Client) -> None:
    bodies = [
        {**BASE, "seed": 51},
        {**REFINED, "seed": 52},
        {**REFINED, "seed": 53, "refiner": {"switch_at": 0.5}},
        {**REFINED, "seed": 54, "init_image": INIT, "strength": 0.8},
    ]
    concurrently_as_alone(client, [{**body, "steps": 16} for body in bodies])


def test_requests_the_refiner_cannot_serve_are_422(client: httpx.Client) -> None:
    def error(body: dict[str, Any]) -> tuple[int, str, str]:
        response = client.post("/v1/generate", json=body)
        payload = response.json()["error"]
        return response.status_code, payload["code"], payload["param"]

    assert error({**BASE, "refiner": {"model": "nope"}}) == (
        422,
        "unknown_refiner",
        "refiner.model",
    )
    inpaint = {**REFINED, "init_image": INIT, "mask": MASK}
    assert error(inpaint)[:2] == (422, "refiner_unsupported")
    assert error({**REFINED, "model": "tiny-inpaint"})[:2] == (422, "refiner_unsupported")
    assert error({**BASE, "steps": 4, "refiner": {"switch_at": 0.1}})[2] == "refiner.switch_at"
    assert error({**BASE, "refiner": {"switch_at": 1.5}})[0] == 422

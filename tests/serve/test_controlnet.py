"""ControlNets on the default app (`tiny` with `tiny-canny`): over HTTP JSON, the NDJSON stream and
the handle API the same image, the canny preprocessor equal to sending its edge map yourself,
requests with and without ControlNets sharing UNet calls and each getting its own image, and
bad ControlNet inputs answered with their 4xx."""

from __future__ import annotations

import uuid
from typing import Any

import cv2
import httpx
import numpy as np
from PIL import Image

from tests.serve.test_batching import finished, image_pixels, stream
from tests.serve.test_handles_and_cancel import handle_client  # noqa: F401 (a fixture)
from tests.serve.test_image_inputs import INIT, _gif, concurrently_as_alone, png, post

BASE = {"model": "tiny", "prompt": "a red house in the forest", "steps": 6, "seed": 5}


def _circles(size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    disc = np.hypot(x - size / 2, y - size / 2) < size / 3
    square = (np.abs(x - 16) < 8) & (np.abs(y - 48) < 8)
    return Image.fromarray(np.where(disc | square, 230, 20).astype(np.uint8)).convert("RGB")


CANNY = [{"id": "tiny-canny", "image": png(_circles()), "preprocessor": "canny"}]


def test_controlnet_over_json_stream_and_handle(
    client: httpx.Client,
    app_url: str,
    handle_client: Any,  # noqa: F811
) -> None:
    body = {**BASE, "controlnet": CANNY}
    job_id = f"controlnet-{uuid.uuid4().hex[:8]}"
    via_json = post(client, body, job_id)
    assert finished(job_id)["steps"] == 6
    events = stream(app_url, body, f"{job_id}-s")
    assert [e["event"] for e in events] == ["queued"] + ["step"] * 6 + ["result"]
    via_handle = handle_client.unary.remote(body).result(timeout_s=120)
    assert np.array_equal(image_pixels(via_json), image_pixels(events[-1]))
    assert np.array_equal(image_pixels(via_json), image_pixels(via_handle))
    plain = post(client, BASE)
    assert np.abs(image_pixels(via_json) - image_pixels(plain)).mean() > 2
    off = post(client, {**BASE, "controlnet": [{**CANNY[0], "scale": 0.0}]})
    assert np.array_equal(image_pixels(off), image_pixels(plain))


def test_canny_equals_sending_the_edge_map(client: httpx.Client) -> None:
    edges = cv2.Canny(np.asarray(_circles()), 100, 200)
    edge_map = Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))
    given = post(client, {**BASE, "controlnet": [{"id": "tiny-canny", "image": png(edge_map)}]})
    assert np.array_equal(
        image_pixels(given), image_pixels(post(client, {**BASE, "controlnet": CANNY}))
    )


def test_controlnet_with_img2img_and_in_a_shared_batch(client: httpx.Client) -> None:
    bodies = [
        {**BASE, "seed": 41},
        {**BASE, "seed": 42, "controlnet": CANNY},
        {**BASE, "seed": 43, "controlnet": [{**CANNY[0], "scale": 0.5, "end": 0.5}]},
        {**BASE, "seed": 44, "init_image": INIT, "strength": 0.9, "controlnet": CANNY},
    ]
    ids = concurrently_as_alone(client, [{**body, "steps": 20} for body in bodies])
    shared = max(finished(job_id)["max_batch_requests"] for job_id in ids)
    assert shared >= 3, "requests with different ControlNets, or none, share UNet calls"


def test_bad_controlnet_inputs_are_4xx(client: httpx.Client) -> None:
    def error(controlnet: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        response = client.post("/v1/generate", json={**BASE, "controlnet": controlnet})
        return response.status_code, response.json()["error"]

    status, body = error([{"id": "nope", "image": INIT}])
    assert (status, body["code"], body["param"]) == (422, "unknown_controlnet", "controlnet.0.id")
    status, body = error([{"id": "tiny-canny", "image": INIT, "start": 0.8, "end": 0.2}])
    assert status == 422 and body["param"].startswith("controlnet.0")
    status, body = error([{"id": "tiny-canny", "image": _gif()}])
    assert (status, body["code"], body["param"]) == (415, "unsupported_image", "controlnet.0.image")
    status, body = error([{"id": "tiny-canny", "image": INIT, "preprocessor": "depth"}])
    assert status == 422 and body["param"].startswith("controlnet.0")

"""Image inputs end to end on the default app: img2img, inpainting (4- and 9-channel models),
start image + noise, noise masks and image prompts through HTTP JSON, the NDJSON/SSE streams and
the handle API, sharing UNet calls in the step batcher; and hostile images answered with their 4xx
in milliseconds while the Router's memory stays flat."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import APP_NAME
from tests.serve.test_batching import finished, image_pixels, stream
from tests.serve.test_handles_and_cancel import handle_client  # noqa: F401 (a fixture)

BASE = {"model": "tiny", "prompt": "a red house in the forest", "steps": 6, "seed": 3}


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def picture(width: int = 64, height: int = 64) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 90)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def right_half_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask)


INIT = png(picture())
MASK = png(right_half_mask())


def post(client: httpx.Client, body: dict[str, Any], job_id: str | None = None) -> dict[str, Any]:
    headers = {"x-request-id": job_id} if job_id else {}
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def concurrently_as_alone(client: httpx.Client, bodies: list[dict[str, Any]]) -> list[str]:
    """Send `bodies` one by one, then all at once; assert each concurrent result has the pixels
    of its lone run, and return the concurrent requests' ids (for their job stats)."""
    alone = [image_pixels(post(client, body)) for body in bodies]
    ids = [f"together-{uuid.uuid4().hex[:8]}" for _ in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda pair: post(client, *pair), zip(bodies, ids, strict=True)))
    for expected, result in zip(alone, together, strict=True):
        assert np.abs(image_pixels(result) - expected).max() <= 1
    return ids


def test_img2img_is_the_same_image_over_json_stream_and_handle(
    client: httpx.Client,
    app_url: str,
    handle_client: Any,  # noqa: F811
) -> None:
    body = {**BASE, "init_image": INIT, "strength": 0.5}
    job_id = f"img2img-{uuid.uuid4().hex[:8]}"
    via_json = post(client, body, job_id)
    assert finished(job_id)["steps"] == 3  # int(6 * 0.5): the skipped half is never run
    events = stream(app_url, body, f"{job_id}-s")
    assert [e["event"] for e in events] == ["queued", "step", "step", "step", "result"]
    via_handle = handle_client.unary.remote(body).result(timeout_s=120)
    plain = post(client, BASE)
    assert np.array_equal(image_pixels(via_json), image_pixels(events[-1]))
    assert np.array_equal(image_pixels(via_json), image_pixels(via_handle))
    assert not np.array_equal(image_pixels(via_json), image_pixels(plain))


def test_every_image_input_through_the_handle_stream_equals_http(
    client: httpx.Client,
    handle_client: Any,  # noqa: F811
) -> None:
    bodies = {
        "inpaint-9-channel": {**BASE, "model": "tiny-inpaint", "init_image": INIT, "mask": MASK},
        "start-image": {**BASE, "start_image": INIT, "start_noise": 0.5},
        "noise-mask": {**BASE, "noise_mask": {"pattern": "ring", "strength": 0.9}},
        "image-prompt": {**BASE, "image_prompt": INIT, "image_prompt_scale": 0.5},
    }
    for name, body in bodies.items():
        events = handle_client.streamed.remote(body).result(timeout_s=120)
        assert [e["event"] for e in events] == ["queued"] + ["step"] * 6 + ["result"], name
        over_http = post(client, body)
        assert np.array_equal(image_pixels(events[-1]), image_pixels(over_http)), name


def test_a_request_without_a_size_takes_its_images(client: httpx.Client) -> None:
    body = {**BASE, "init_image": png(picture(96, 72))}
    image = post(client, body)["images"][0]
    assert (image["width"], image["height"]) == (96, 72)


@pytest.mark.parametrize("model", ["tiny", "tiny-inpaint"])
def test_inpainting_streams_over_sse(app_url: str, model: str) -> None:
    body = {**BASE, "model": model, "init_image": INIT, "mask": MASK, "mask_blur": 2.0}
    with (
        httpx.Client(base_url=app_url, timeout=120) as http,
        http.stream(
            "POST",
            "/v1/generate",
            json={**body, "stream": True, "preview": "latent"},
            headers={"accept": "text/event-stream"},
        ) as response,
    ):
        assert response.status_code == 200
        data = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert [e["event"] for e in data] == ["queued"] + ["step"] * 6 + ["result"]
    assert data[1]["previews"], "previews stream for inpainting too"
    # Inpainting defaults to strength 1.0: every step runs.
    assert data[-1]["images"][0]["width"] == 64


def test_start_image_and_noise_masks(client: httpx.Client) -> None:
    plain = image_pixels(post(client, BASE))
    started = image_pixels(post(client, {**BASE, "start_image": INIT, "start_noise": 0.4}))
    masked_body = {**BASE, "noise_mask": {"pattern": "circle", "strength": 1.0, "end": 0.5}}
    masked = image_pixels(post(client, masked_body))
    again = image_pixels(post(client, masked_body))
    inverted = {**masked_body, "noise_mask": {**masked_body["noise_mask"], "invert": True}}
    custom = {**BASE, "noise_mask": {"image": MASK, "strength": 1.0}}
    results = [plain, started, masked, image_pixels(post(client, inverted))]
    results.append(image_pixels(post(client, custom)))
    assert np.array_equal(masked, again)  # deterministic per seed
    assert len({r.tobytes() for r in results}) == len(results)


def test_noise_mask_catalog_lists_nine_patterns(client: httpx.Client) -> None:
    body = client.get("/v1/noise-masks").json()
    names = [entry["name"] for entry in body["data"]]
    assert len(names) == 9 and {"circle", "square", "edges"} <= set(names)
    preview = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["preview"])))
    assert preview.size == (64, 64)


def test_image_prompt_steers_the_image_where_the_model_has_an_adapter(
    client: httpx.Client,
) -> None:
    plain = image_pixels(post(client, BASE))
    prompted = post(client, {**BASE, "image_prompt": INIT, "image_prompt_scale": 1.0})
    weaker = post(client, {**BASE, "image_prompt": INIT, "image_prompt_scale": 0.3})
    assert not np.array_equal(plain, image_pixels(prompted))
    assert not np.array_equal(image_pixels(prompted), image_pixels(weaker))
    refused = client.post(
        "/v1/generate", json={**BASE, "model": "tiny-inpaint", "image_prompt": INIT}
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "image_prompt_unsupported"


def test_mixed_image_requests_share_unet_calls_and_match_alone(client: httpx.Client) -> None:
    bodies = [
        {**BASE, "seed": 21},
        {**BASE, "seed": 22, "init_image": INIT, "strength": 0.9},
        {**BASE, "seed": 23, "init_image": INIT, "mask": MASK},
        {**BASE, "seed": 24, "image_prompt": INIT},
        {**BASE, "seed": 25, "noise_mask": {"pattern": "edges"}},
    ]
    ids = concurrently_as_alone(client, [{**body, "steps": 20} for body in bodies])
    shared = max(finished(job_id)["max_batch_requests"] for job_id in ids)
    assert shared >= 3, "image requests of one model and size share UNet calls"


def _bomb_png() -> str:
    """A real 1x1 PNG whose header claims 50000 x 50000 pixels."""
    import struct
    import zlib

    raw = base64.b64decode(png(Image.new("RGB", (1, 1))).split(",", 1)[1])
    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return base64.b64encode(raw[:8] + ihdr + raw[33:]).decode()


def _jpeg_truncated() -> str:
    buffer = io.BytesIO()
    picture(256, 256).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()[:600]).decode()


def _gif() -> str:
    buffer = io.BytesIO()
    picture().save(buffer, format="GIF")
    return base64.b64encode(buffer.getvalue()).decode()


SVG = base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>').decode()
HOSTILE = {
    "bomb": (_bomb_png(), 413, "image_too_large"),
    "truncated-jpeg": (_jpeg_truncated(), 400, "invalid_image"),
    "svg": (SVG, 415, "unsupported_image"),
    "gif": (_gif(), 415, "unsupported_image"),
    "url": ("https://example.com/cat.png", 422, "remote_image_not_allowed"),
}


def _router_rss() -> int:
    """Resident memory of the default app's Router replica: Ray names its worker process
    `ray::ServeReplica:<app>:Router` (the dashboard's state API is off in these tests)."""
    import psutil

    title = f"ServeReplica:{APP_NAME}:Router"
    processes = [
        p for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or [])
    ]
    assert processes, "the default app's Router replica"
    return sum(process.memory_info().rss for process in processes)


def test_hostile_images_get_their_4xx_fast_and_memory_stays_flat(client: httpx.Client) -> None:
    before = _router_rss()
    for _ in range(3):
        for name, (data, status, code) in HOSTILE.items():
            for field in ("init_image", "image_prompt"):
                started = time.perf_counter()
                response = client.post("/v1/generate", json={**BASE, field: data})
                elapsed = time.perf_counter() - started
                assert response.status_code == status, (name, field, response.text)
                error = response.json()["error"]
                assert error["code"] == code and error["param"] == field, (name, error)
                assert elapsed < 1.0, (name, elapsed)
    huge = "A" * 30_000_000  # a 30 MB base64 string: refused before it is read
    started = time.perf_counter()
    response = client.post("/v1/generate", content=json.dumps({**BASE, "init_image": huge}))
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert time.perf_counter() - started < 5.0
    assert _router_rss() - before < 64 * 2**20
    assert client.post("/v1/generate", json={**BASE, "init_image": INIT}).status_code == 200

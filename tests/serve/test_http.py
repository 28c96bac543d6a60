"""The HTTP API end to end: JSON, NDJSON and SSE generation, determinism, and the error envelope."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
from PIL import Image

BASE = {"model": "tiny", "prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4}


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(response: dict) -> np.ndarray:
    return np.asarray(decode(response["images"][0]["b64"]))


def test_json_generate_returns_png_of_requested_size(client: httpx.Client) -> None:
    response = client.post("/v1/generate", json={**BASE, "width": 96, "height": 64, "seed": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny" and body["backend"] == "local"
    image = decode(body["images"][0]["b64"])
    assert image.format == "PNG" and image.size == (96, 64)
    assert body["images"][0]["seed"] == 7
    timings = body["timings"]
    assert timings["total_ms"] >= timings["denoise_ms"] > 0 and timings["decode_ms"] > 0


def test_n_images_get_consecutive_seeds(client: httpx.Client) -> None:
    body = client.post("/v1/generate", json={**BASE, "seed": 100, "n": 2}).json()
    assert [image["seed"] for image in body["images"]] == [100, 101]
    single = client.post("/v1/generate", json={**BASE, "seed": 101}).json()
    second = np.asarray(decode(body["images"][1]["b64"])).astype(int)
    assert np.abs(second - pixels(single)).max() <= 1


def test_same_seed_same_pixels_different_seed_different(client: httpx.Client) -> None:
    first = client.post("/v1/generate", json={**BASE, "seed": 42}).json()
    again = client.post("/v1/generate", json={**BASE, "seed": 42}).json()
    other = client.post("/v1/generate", json={**BASE, "seed": 43}).json()
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def read_ndjson(response: httpx.Response) -> list[tuple[float, dict]]:
    return [(time.monotonic(), json.loads(line)) for line in response.iter_lines() if line]


def test_ndjson_stream_delivers_steps_before_the_result(client: httpx.Client) -> None:
    request = {
        **BASE,
        "width": 256,
        "height": 256,
        "steps": 24,
        "stream": True,
        "preview": "full",
        "seed": 1,
    }
    with client.stream("POST", "/v1/generate", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        received = read_ndjson(response)
    events = [event for _, event in received]
    steps = [event for event in events if event["event"] == "step"]
    assert [step["index"] for step in steps] == list(range(1, 25))
    assert all(step["total"] == 24 for step in steps)
    assert events[-1]["event"] == "result"
    assert decode(events[-1]["images"][0]["b64"]).size == (256, 256)
    preview = decode(steps[0]["previews"][0]["b64"])
    assert preview.format == "JPEG" and max(preview.size) <= 256
    # Streaming, not buffering: the first step reached us while the server still had most of the
    # denoising ahead of it (server-side step clock vs. our receive clock).
    first_seen, result_seen = received[0][0], received[-1][0]
    server_span_s = (steps[-1]["elapsed_ms"] - steps[0]["elapsed_ms"]) / 1000
    assert result_seen - first_seen >= 0.5 * server_span_s > 0


def test_sse_stream_uses_event_and_data_lines(client: httpx.Client) -> None:
    request = {**BASE, "stream": True, "preview": "latent", "seed": 3}
    headers = {"accept": "text/event-stream"}
    with client.stream("POST", "/v1/generate", json=request, headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    blocks = [block for block in text.split("\n\n") if block.strip()]
    names = [block.split("\n")[0] for block in blocks]
    assert names == ["event: queued"] + ["event: step"] * 4 + ["event: result"]
    payloads = [json.loads(block.split("\n")[1].removeprefix("data: ")) for block in blocks]
    assert payloads[0]["position"] >= 0
    assert [p["index"] for p in payloads[1:5]] == [1, 2, 3, 4]
    assert decode(payloads[-1]["images"][0]["b64"]).size == (64, 64)


def assert_error(response: httpx.Response, status: int, code: str, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert error["code"] == code and error["param"] == param
    assert error["message"]
    return error


def test_invalid_requests_get_422_with_the_error_envelope(client: httpx.Client) -> None:
    # An unknown model is not a broken rule but a missing resource: 404, as OpenAI answers it.
    assert_error(
        client.post("/v1/generate", json={**BASE, "model": "nope"}), 404, "model_not_found", "model"
    )
    cases = [
        ({"height": 1000}, "invalid_value", "height"),
        ({"width": 60}, "invalid_value", "width"),
        ({"steps": 0}, "invalid_value", "steps"),
        ({"steps": 101}, "invalid_value", "steps"),
        ({"n": 9}, "invalid_value", "n"),
        ({"guidance_scale": 99}, "invalid_value", "guidance_scale"),
        ({"scheduler": "warp"}, "unknown_scheduler", "scheduler"),
        ({"preview": "huge"}, "invalid_value", "preview"),
        ({"colour": "red"}, "unknown_field", "colour"),
        ({"prompt": "x" * 5000}, "prompt_too_long", "prompt"),
        ({"prompt": "zebra " * 40}, "prompt_too_long", "prompt"),
        ({"width": 512, "height": 1024}, "invalid_value", "height"),
    ]
    for change, code, param in cases:
        error = assert_error(client.post("/v1/generate", json={**BASE, **change}), 422, code, param)
        assert error["type"] == "invalid_request_error"
    message = client.post("/v1/generate", json={**BASE, "height": 1000}).json()["error"]["message"]
    assert "multiple of 8" in message and "1000" in message
    missing = client.post("/v1/generate", json={"model": "tiny"})
    assert_error(missing, 422, "missing_field", "prompt")


def test_stream_validation_errors_are_plain_4xx(client: httpx.Client) -> None:
    response = client.post("/v1/generate", json={**BASE, "stream": True, "height": 12})
    assert_error(response, 422, "invalid_value", "height")


def test_malformed_bodies_get_400(client: httpx.Client) -> None:
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = client.post(
            "/v1/generate", content=body, headers={"content-type": "application/json"}
        )
        assert_error(response, 400, "malformed_json", None)


def test_unknown_route_uses_the_envelope(client: httpx.Client) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_models_health_and_readiness(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    by_id = {card["id"]: card for card in models["data"]}
    assert set(by_id) == {"tiny", "tiny-inpaint"}
    tiny = by_id["tiny"]
    assert tiny["id"] == "tiny" and tiny["backend"] == "local" and tiny["loaded"] is True
    assert tiny["state"]["state"] == "cached" and tiny["state"]["bytes"] > 1_000_000
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["backends"] == {
        "ClipEncoder": "ok",
        "SDXLPipeline": "ok",
        "ModelCache": "ok",
    }


def parts(body: bytes) -> list[tuple[str, bytes]]:
    """(content type, payload) of each part of a multipart/x-mixed-replace body."""
    found = []
    for chunk in body.split(b"--frame\r\n")[1:]:
        head, _, rest = chunk.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        found.append((headers["Content-Type"], rest[: int(headers["Content-Length"])]))
    return found


def test_an_img_tag_can_watch_a_generation(client: httpx.Client) -> None:
    query = {"model": "tiny", "prompt": "a cat", "width": 64, "height": 64, "steps": 4, "seed": 8}
    response = client.get("/v1/generate", params=query)
    assert response.status_code == 200
    assert response.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
    assert response.content.endswith(b"--frame--\r\n")
    frames = parts(response.content)
    assert [kind for kind, _ in frames] == ["image/jpeg"] * 4 + ["image/png"]
    final = Image.open(io.BytesIO(frames[-1][1]))
    expected = client.post("/v1/generate", json={**query, "stream": False}).json()
    assert np.array_equal(np.asarray(final), pixels(expected))
    # The same frames for a POST that asks for them.
    posted = client.post(
        "/v1/generate",
        json={**query, "stream": True},
        headers={"accept": "multipart/x-mixed-replace"},
    )
    assert [kind for kind, _ in parts(posted.content)] == [kind for kind, _ in frames]
    refused = client.get("/v1/generate", params={**query, "steps": 0})
    assert_error(refused, 422, "invalid_value", "steps")

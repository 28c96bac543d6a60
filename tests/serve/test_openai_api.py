"""OpenAI's Images API on the default app, driven by the official `openai` SDK over real HTTP:
b64 images equal to our own /v1/generate for the same seed and steps, streamed partial images
then the completed event, and the SDK's typed errors for what we refuse."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

PROMPT = "a lighthouse on a cliff"


@pytest.fixture(scope="module")
def sdk(app_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="not-checked", max_retries=0)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generate_returns_the_image_our_api_returns(sdk: openai.OpenAI, app_url: str) -> None:
    result = sdk.images.generate(
        model="tiny",
        prompt=PROMPT,
        size="96x64",
        quality="low",  # 4 steps in serve_config.yaml
        n=2,
        extra_body={"seed": 5, "negative_prompt": "blurry"},
    )
    assert result.data is not None and len(result.data) == 2
    assert result.size == "96x64" and result.output_format == "png"
    images = [decode(item.b64_json or "") for item in result.data]
    assert all(image.format == "PNG" and image.size == (96, 64) for image in images)
    ours = httpx.post(
        f"{app_url}/v1/generate",
        json={"model": "tiny", "prompt": PROMPT, "negative_prompt": "blurry", "width": 96,
              "height": 64, "steps": 4, "seed": 5, "n": 2},
        timeout=120,
    ).json()  # fmt: skip
    for image, expected in zip(images, ours["images"], strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(decode(expected["b64"])))


def test_streaming_yields_partial_images_then_the_completed_image(sdk: openai.OpenAI) -> None:
    stream = sdk.images.generate(
        model="tiny",
        prompt=PROMPT,
        size="64x64",
        stream=True,
        partial_images=2,
        output_format="webp",
        extra_body={"seed": 9, "steps": 9},
    )
    events = list(stream)
    types = [event.type for event in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    final = decode(events[-1].b64_json)
    assert final.format == "WEBP" and final.size == (64, 64)
    partials = [np.asarray(decode(event.b64_json)).astype(int) for event in events[:2]]
    assert decode(events[0].b64_json).format == "WEBP"
    assert np.abs(partials[0] - partials[1]).max() > 0  # two different moments of denoising


def test_refusals_arrive_as_the_sdks_typed_errors(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as transparent:
        sdk.images.generate(model="tiny", prompt=PROMPT, background="transparent")
    assert transparent.value.code == "unsupported_value"
    assert "transparent" in transparent.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.images.generate(model="no-such-model", prompt=PROMPT)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as size:
        sdk.images.generate(model="tiny", prompt=PROMPT, size="1000x1000")
    assert size.value.param == "height" or size.value.param == "width"
    with pytest.raises(openai.BadRequestError) as url:
        sdk.images.generate(model="tiny", prompt=PROMPT, response_format="url", stream=True)
    assert url.value.param == "response_format"


def test_url_responses_are_stored_once_and_served_by_signed_links(sdk: openai.OpenAI) -> None:
    request_id = f"url-{uuid.uuid4().hex[:8]}"
    fields = {"model": "tiny", "prompt": PROMPT, "size": "64x64", "quality": "low"}
    extra = {"extra_body": {"seed": 12}, "extra_headers": {"x-request-id": request_id}}
    first = sdk.images.generate(**fields, response_format="url", **extra)
    url = first.data[0].url if first.data else None
    assert url is not None and f"/v1/files/{request_id}/0.png?" in url
    served = httpx.get(url, timeout=30)
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    inline = sdk.images.generate(**fields, extra_body={"seed": 12})
    assert inline.data is not None
    assert served.content == base64.b64decode(inline.data[0].b64_json or "")
    metadata = httpx.get(url.replace("/0.png?", "/0.json?"), timeout=30)
    assert metadata.status_code == 404  # a link signs one file, not its neighbours
    stored = Path("/tmp/diffusion-serve/outputs") / request_id
    meta = json.loads((stored / "0.json").read_text())
    assert (meta["seed"], meta["width"], meta["request"]["steps"]) == (12, 64, 4)
    written = (stored / "0.png").stat().st_mtime_ns
    sdk.images.generate(**fields, response_format="url", **extra)  # the same request id again
    assert (stored / "0.png").stat().st_mtime_ns == written  # not stored twice
    tampered = httpx.get(url.replace("sig=", "sig=x"), timeout=30)
    assert tampered.status_code == 404 and tampered.json()["error"]["code"] == "file_not_found"

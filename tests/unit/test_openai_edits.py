"""`POST /v1/images/edits` without Ray: the official `openai` SDK's multipart requests against the
app around a fake backend that keeps the `GenerateRequest` it got. The image arrives byte for
byte as `init_image`, the mask follows OpenAI's rule (fully transparent = edit), OpenAI's size,
n and quality map as for generations, the stream is OpenAI's `image_edit.*` events, and every
bad upload is refused with its 4xx before the backend sees it."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from shared.api.routes import build_api
from shared.api.schemas import GenerateRequest
from shared.config import LimitsConfig, StorageConfig
from shared.storage import OutputStore
from tests.unit.test_routes import FakeBackend, assert_envelope

pytestmark = pytest.mark.anyio
SIZE = (48, 32)
HOLE = (slice(4, 12), slice(8, 20))  # rows, columns made fully transparent
HAZE = (slice(20, 24), slice(0, 48))  # half transparent: not an edit by OpenAI's rule


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def with_alpha(size: tuple[int, int] = SIZE) -> Image.Image:
    pixels = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    pixels[..., 0] = np.arange(size[0], dtype=np.uint8)[None, :] * 5
    pixels[..., 3] = 255
    pixels[(*HOLE, 3)] = 0
    pixels[(*HAZE, 3)] = 128
    return Image.fromarray(pixels, "RGBA")


def expected_mask(size: tuple[int, int] = SIZE) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[HOLE] = 255
    return mask


def payload(data_url: str | None) -> tuple[str, bytes]:
    assert data_url is not None
    header, _, body = data_url.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header
    return header.removeprefix("data:").removesuffix(";base64"), base64.b64decode(body)


def mask_of(request: GenerateRequest) -> np.ndarray:
    media, data = payload(request.mask)
    assert media == "image/png"
    return np.array(Image.open(io.BytesIO(data)))


class Edits:
    """The fake backend, an HTTP client of the app, and the SDK over that client."""

    def __init__(self, backend: FakeBackend, http: httpx.AsyncClient) -> None:
        self.backend = backend
        self.http = http
        self.sdk = openai.AsyncOpenAI(
            base_url="http://test/v1", api_key="sk-test", http_client=http, max_retries=0
        )


@pytest.fixture
async def edits() -> AsyncIterator[Edits]:
    backend = FakeBackend()
    backend.limits = LimitsConfig(max_body_bytes=100_000)
    app = build_api(lambda: backend)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as http:
        yield Edits(backend, http)


async def test_an_image_with_transparency_is_repainted_where_alpha_is_zero(edits: Edits) -> None:
    upload = encode(with_alpha())
    result = await edits.sdk.images.edit(
        model="tiny",
        image=("cat.png", upload, "image/png"),
        prompt="a hat",
        size="96x64",
        n=2,
        quality="low",
        output_format="png",
        user="someone",
        extra_body={
            "seed": 5,
            "negative_prompt": "blurry",
            "guidance_scale": 3.5,
            "scheduler": "euler",
        },
    )
    assert result.data is not None and result.data[0].b64_json
    assert result.size == "8x8" and result.output_format == "png"  # the fake's image
    (request,) = edits.backend.requests
    assert payload(request.init_image) == ("image/png", upload)
    assert np.array_equal(mask_of(request), expected_mask())
    assert (request.width, request.height, request.n) == (96, 64, 2)
    assert request.steps == 15  # quality low in OpenAIImagesConfig
    assert (request.seed, request.negative_prompt, request.scheduler) == (5, "blurry", "euler")
    assert request.guidance_scale == 3.5 and request.prompt == "a hat"
    assert request.strength is None and not request.stream  # the Router's inpainting default


async def test_a_mask_file_marks_the_edit_of_an_opaque_image(edits: Edits, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode(Image.new("RGB", SIZE, (10, 120, 200)), "JPEG"))
    mask = tmp_path / "mask.png"
    mask.write_bytes(encode(with_alpha()))
    with photo.open("rb") as image_file, mask.open("rb") as mask_file:
        await edits.sdk.images.edit(
            model="tiny",
            image=[image_file],  # a list: the SDK sends it as `image[]`
            mask=mask_file,
            prompt="a hat",
            extra_body={"strength": 0.6, "mask_blur": 2, "steps": 7},
        )
    (request,) = edits.backend.requests
    assert payload(request.init_image) == ("image/jpeg", photo.read_bytes())
    assert np.array_equal(mask_of(request), expected_mask())
    assert (request.strength, request.mask_blur, request.steps) == (0.6, 2.0, 7)
    assert (request.width, request.height) == (None, None)  # size auto: the image's


async def test_an_image_without_transparency_is_edited_as_a_whole(edits: Edits) -> None:
    opaque_rgba = with_alpha()
    opaque_rgba.putalpha(255)
    for image in (Image.new("RGB", SIZE, "white"), opaque_rgba):
        await edits.sdk.images.edit(
            model="tiny",
            image=("plain.png", encode(image), "image/png"),
            prompt="a hat",
            extra_body={"strength": 0.3},
        )
    for request in edits.backend.requests:
        assert request.init_image and request.mask is None and request.strength == 0.3
    assert len(edits.backend.requests) == 2


async def test_edits_stream_openais_edit_events(edits: Edits) -> None:
    stream = await edits.sdk.images.edit(
        model="tiny",
        image=("cat.png", encode(with_alpha()), "image/png"),
        prompt="a hat",
        stream=True,
        partial_images=1,
        output_format="webp",
        extra_body={"steps": 4},
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[0].partial_image_index == 0
    for event in events:
        image = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
        assert image.format == "WEBP" and event.output_format == "webp"
    (request,) = edits.backend.requests
    assert request.stream and request.preview == "full" and request.preview_every == 2
    assert request.mask is not None
    assert edits.backend.closed_streams == 1


async def test_url_answers_store_the_output_without_the_inputs(
    edits: Edits, tmp_path: Path
) -> None:
    store = OutputStore(StorageConfig(url=str(tmp_path)), b"secret")
    edits.backend.output_store = store  # type: ignore[assignment]
    result = await edits.sdk.images.edit(
        model="tiny",
        image=("cat.png", encode(with_alpha()), "image/png"),
        prompt="a hat",
        response_format="url",
        extra_headers={"x-request-id": "edit-1"},
    )
    assert result.data is not None and "/v1/files/edit-1/0.png?" in (result.data[0].url or "")
    meta = json.loads((tmp_path / "edit-1" / "0.json").read_text())
    assert meta["request"]["prompt"] == "a hat"
    assert not {"init_image", "mask"} & set(meta["request"])  # MBs of input stay out


def _gif() -> bytes:
    return encode(Image.new("RGB", SIZE, "red"), "GIF")


def _png(size: tuple[int, int] = SIZE) -> tuple[str, bytes, str]:
    return ("image.png", encode(with_alpha(size)), "image/png")


FIELDS = {"model": "tiny", "prompt": "a hat"}
FORM_X = "multipart/form-data; boundary=x"
NAMELESS = b"--x\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--x--\r\n"
OPAQUE_MASK = ("m.png", encode(Image.new("RGBA", SIZE, (0, 0, 0, 255))), "image/png")
JPEG_MASK = ("m.jpg", encode(Image.new("RGB", SIZE), "JPEG"), "image/jpeg")
REFUSALS: dict[str, tuple[dict[str, Any], int, str, str | None]] = {
    "missing-image": ({"files": {"mask": _png()}}, 400, "missing_field", "image"),
    "gif": ({"files": {"image": ("a.gif", _gif(), "image/gif")}}, 415, "unsupported_image",
            "image"),
    "corrupt": ({"files": {"image": ("a.png", encode(with_alpha())[:60], "image/png")}}, 400,
                "invalid_image", "image"),
    "mask-size": ({"files": {"image": _png(), "mask": _png((48, 40))}}, 400, "invalid_mask",
                  "mask"),
    "mask-opaque": ({"files": {"image": _png(), "mask": JPEG_MASK}}, 400, "invalid_mask", "mask"),
    "mask-marks-nothing": ({"files": {"image": _png(), "mask": OPAQUE_MASK}}, 400,
                           "invalid_mask", "mask"),
    "two-images": ({"files": [("image[]", _png()), ("image[]", _png())]}, 400,
                   "unsupported_value", "image"),
    "image-as-text": ({"data": {**FIELDS, "image": "abc"}, "files": {"mask": _png()}}, 400,
                      "invalid_value", "image"),
    "unknown-field": ({"data": {**FIELDS, "colour": "red"}}, 400, "unknown_field", "colour"),
    "transparent": ({"data": {**FIELDS, "background": "transparent"}}, 400,
                    "unsupported_value", "background"),
    "url-without-storage": ({"data": {**FIELDS, "response_format": "url"}}, 400,
                            "unsupported_value", "response_format"),
    "strength": ({"data": {**FIELDS, "strength": "0"}}, 400, "invalid_value", "strength"),
    "not-a-form": ({"json": FIELDS, "files": None}, 415, "unsupported_media_type", None),
    "urlencoded": ({"files": None}, 415, "unsupported_media_type", None),
    "nameless-part": ({"files": None, "content": NAMELESS, "headers": {"content-type": FORM_X}},
                      400, "malformed_form", None),
    "no-boundary": ({"files": None, "content": NAMELESS,
                     "headers": {"content-type": "multipart/form-data"}}, 400, "malformed_form",
                    None),
    "too-big": ({"files": {"image": ("big.png", b"\x89PNG" + b"0" * 120_000, "image/png")}}, 413,
                "body_too_large", None),
}  # fmt: skip


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
async def test_bad_edits_are_refused_before_the_backend_sees_them(
    edits: Edits, refusal: tuple[dict[str, Any], int, str, str | None]
) -> None:
    given, status, code, param = refusal
    # Each case changes a valid edit: these fields and one image, unless it says otherwise.
    kwargs = {"data": FIELDS, "files": {"image": _png()}, **given}
    if "json" in given or "content" in given:
        del kwargs["data"]
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    response = await edits.http.post("/v1/images/edits", **kwargs)
    error = assert_envelope(response, status, "invalid_request_error", code)
    assert error["param"] == param, error
    assert edits.backend.seen == []


async def test_an_oversized_upload_is_refused_while_it_streams(edits: Edits) -> None:
    request = edits.http.build_request(
        "POST",
        "/v1/images/edits",
        data={"model": "tiny", "prompt": "a hat"},
        files={"image": ("big.png", b"\x89PNG" + b"0" * 150_000, "image/png")},
    )
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        nonlocal sent
        body = request.read()
        for start in range(0, len(body), 10_000):
            sent += 1
            yield body[start : start + 10_000]

    response = await edits.http.post(
        "/v1/images/edits",
        content=chunks(),
        headers={"content-type": request.headers["content-type"]},
    )
    assert_envelope(response, 413, "invalid_request_error", "body_too_large")
    assert sent <= 11  # refused once past 100 kB, not after reading all 150 kB
    assert edits.backend.seen == []


async def test_an_image_over_the_image_limit_is_413_and_the_sdk_says_why(edits: Edits) -> None:
    edits.backend.limits = LimitsConfig(max_body_bytes=100_000, max_image_bytes=2_000)
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(openai.APIStatusError) as too_large:
        await edits.sdk.images.edit(
            model="tiny", image=("noise.png", encode(Image.fromarray(noisy)), "image/png"),
            prompt="a hat",
        )  # fmt: skip
    assert too_large.value.status_code == 413 and too_large.value.code == "image_too_large"
    with pytest.raises(openai.BadRequestError) as wrong_mask:
        await edits.sdk.images.edit(model="tiny", image=_png(), mask=_png((16, 16)), prompt="a hat")
    assert wrong_mask.value.code == "invalid_mask" and "48x32" in wrong_mask.value.message
    assert edits.backend.seen == []

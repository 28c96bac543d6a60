"""Control maps and the control-image intake: `canny` equal to diffusers' recipe (cv2.Canny on the
RGB array, stacked to three channels), `none` the pixels as sent; control images decoded,
checked and fitted to the job's size like an init image, each error naming its entry."""

from __future__ import annotations

import base64
import io
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from shared.api.capabilities import request_record
from shared.api.schemas import GenerateRequest
from shared.api.vocabulary import PREPROCESSORS
from shared.config import LimitsConfig
from shared.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from shared.intake.control_maps import control_map
from shared.intake.images import fit_image
from shared.intake.request_images import decode_images, job_images, with_image_size

LIMITS = LimitsConfig()


def _picture(width: int = 48, height: int = 32) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    disc = np.hypot(x - width / 2, y - height / 2) < height / 3
    rgb = np.stack([np.where(disc, 230, 20), 255 * x // width, 255 * y // height], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _encode(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def _request(*controls: dict[str, Any], **fields: Any) -> GenerateRequest:
    return GenerateRequest.model_validate(
        {"model": "tiny", "prompt": "a", "controlnet": list(controls), **fields}
    )


def test_canny_equals_cv2_canny_stacked_to_three_channels() -> None:
    pixels = np.asarray(_picture())
    edges = control_map(pixels, "canny", 50, 150)
    expected = cv2.Canny(pixels, 50, 150)
    assert edges.shape == (32, 48, 3) and edges.dtype == np.uint8
    assert all(np.array_equal(edges[:, :, c], expected) for c in range(3))
    assert set(np.unique(edges)) == {0, 255}
    assert not np.array_equal(edges, control_map(pixels, "canny", 10, 20))  # thresholds count


def test_none_passes_the_pixels_through() -> None:
    pixels = np.asarray(_picture())
    assert control_map(pixels, "none") is pixels
    assert PREPROCESSORS == ("none", "canny")
    with pytest.raises(ValueError, match="uint8"):
        control_map(pixels[:, :, 0], "canny")


def test_control_images_are_fitted_to_the_job_then_preprocessed() -> None:
    picture = _picture(96, 48)
    request = _request(
        {"id": "edges", "image": _encode(picture), "preprocessor": "canny", "scale": 0.5},
        {"id": "map", "image": "data:image/png;base64," + _encode(picture), "end": 0.4},
        width=32,
        height=32,
    )
    edges, given = job_images(request, decode_images(request, LIMITS))["controlnets"]
    fitted = np.asarray(fit_image(picture, 32, 32))  # cover + centre crop, like init_image
    assert (edges.id, edges.scale, edges.start, edges.end) == ("edges", 0.5, 0.0, 1.0)
    assert np.array_equal(edges.image, np.repeat(cv2.Canny(fitted, 100, 200)[..., None], 3, -1))
    assert (given.id, given.scale, given.end) == ("map", 1.0, 0.4)
    assert np.array_equal(given.image, fitted)
    assert "controlnets" not in job_images(
        _request(width=32, height=32), decode_images(_request(), LIMITS)
    )


def test_a_request_without_a_size_takes_its_first_control_image_size() -> None:
    request = _request({"id": "edges", "image": _encode(_picture(128, 96))})
    sized = with_image_size(request, decode_images(request, LIMITS), LIMITS)
    assert (sized.width, sized.height) == (128, 96)


def test_control_images_are_recorded_as_digests() -> None:
    image = _encode(_picture())
    request = _request({"id": "edges", "image": image, "preprocessor": "canny"})
    record = request_record(request, decode_images(request, LIMITS))
    assert record.request["controlnet"] == [{**request.controlnet[0].model_dump(), "image": None}]
    assert set(record.images) == {"controlnet.0.image"}
    assert (
        record.images["controlnet.0.image"].width,
        record.images["controlnet.0.image"].height,
    ) == (
        48,
        32,
    )


@pytest.mark.parametrize(
    ("image", "error", "code"),
    [
        (_encode(_picture(), "GIF"), UnsupportedMediaTypeError, "unsupported_image"),
        ("https://example.com/edges.png", InvalidRequestError, "remote_image_not_allowed"),
        (_encode(_picture(80, 80)), PayloadTooLargeError, "image_too_large"),
    ],
)
def test_bad_control_images_are_refused_naming_the_entry(
    image: str, error: type[Exception], code: str
) -> None:
    request = _request({"id": "a", "image": _encode(_picture())}, {"id": "b", "image": image})
    with pytest.raises(error) as info:
        decode_images(request, LimitsConfig(max_image_pixels=64 * 64))
    assert (info.value.code, info.value.param) == (code, "controlnet.1.image")  # type: ignore[attr-defined]


def test_too_many_controlnets_are_refused_before_decoding() -> None:
    request = _request(*({"id": str(i), "image": "not base64!"} for i in range(4)))
    with pytest.raises(InvalidRequestError) as info:
        decode_images(request, LIMITS)
    assert (info.value.code, info.value.param) == ("too_many_controlnets", "controlnet")

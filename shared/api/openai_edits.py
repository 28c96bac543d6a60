"""`POST /v1/images/edits`: OpenAI's multipart form, as the official SDK sends it, becomes a
`GenerateRequest` with an init image and, where OpenAI's rules give one, a mask; the answer and
its stream are `shared.api.openai_images`'. Torch-free.

OpenAI's mask marks what to edit with full transparency (alpha 0); ours is white where to
repaint. So the mask is white exactly where the mask file's alpha is 0 and black elsewhere
(OpenAI's "fully transparent", not a soft 255 - alpha). Without a mask file the image's own
alpha plays that part; an image with no transparent pixel is edited as a whole (img2img).
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import Field, ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from shared.api.openai_images import ImagesRequest, to_generate_request
from shared.api.schemas import GenerateRequest
from shared.config import LimitsConfig, OpenAIImagesConfig
from shared.errors import InvalidRequestError, MalformedRequestError, UnsupportedMediaTypeError
from shared.imaging import encode_image
from shared.intake.decode_pool import decode_pool
from shared.intake.images import alpha_channel, decode_image
from shared.intake.resolve import from_validation_error
from shared.intake.text import check_text

FORM = "multipart/form-data"
# The SDK sends one image as `image` and a list as `image[]`.
IMAGE_FIELDS = ("image", "image[]")
FILE_FIELDS = (*IMAGE_FIELDS, "mask")
# One image and one mask are taken; a few more files get a message that says so, not a
# parser's. The text fields are a score of short ones.
MAX_FILES = 16
MAX_FIELDS = 64
IMAGE_MEDIA_TYPE = re.compile(r"image/[a-z0-9.+-]+")


class ImagesEditRequest(ImagesRequest):
    """The form fields of `POST /v1/images/edits` besides its files (`image`, `mask`)."""

    stream_event: ClassVar[str] = "image_edit"

    input_fidelity: Literal["high", "low"] | None = Field(default=None, description="Accepted.")
    # Our knobs, with GenerateRequest's rules: one definition of what they mean.
    strength: Annotated[float | None, GenerateRequest.model_fields["strength"]] = None
    mask_blur: Annotated[float, GenerateRequest.model_fields["mask_blur"]] = 0.0


@dataclass(frozen=True)
class Upload:
    """An uploaded file's bytes and the media type its part declared."""

    data: bytes
    content_type: str

    def data_url(self) -> str:
        # The bytes go on as uploaded; the intake sniffs the real format from them.
        declared = IMAGE_MEDIA_TYPE.fullmatch(self.content_type.strip().lower())
        media = declared.group(0) if declared else "application/octet-stream"
        return f"data:{media};base64,{base64.b64encode(self.data).decode()}"


def edit_form_schema() -> dict[str, Any]:
    """The form's OpenAPI schema: the request's fields plus its files."""
    schema = ImagesEditRequest.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {
        "image": {**binary, "description": "The image to edit (PNG, JPEG or WebP); the SDK "
                  "sends a list of one as `image[]`."},
        "mask": {**binary, "description": "A PNG the image's size whose fully transparent "
                 "pixels mark what to edit; without it, the image's own alpha does."},
        **schema["properties"],
    }  # fmt: skip
    schema["required"] = ["image", *schema.get("required", [])]
    return schema


async def edit_request(
    headers: Headers,
    body: AsyncGenerator[bytes, None],
    config: OpenAIImagesConfig,
    limits: LimitsConfig,
    can_store: bool,
) -> tuple[ImagesEditRequest, GenerateRequest]:
    """The edit request in the form `body` carries (its size limited by the caller) and our
    request for it."""
    form = await _parse_form(headers, body)
    try:
        request, image, mask = await _read_form(form)
    finally:
        await form.close()
    # Decoded in the bounded intake pool: a large image would stall every request on the loop.
    generate_request = await decode_pool(limits).run(
        to_edit_generate_request, request, image, mask, config, limits, can_store
    )
    return request, generate_request


async def _parse_form(headers: Headers, body: AsyncGenerator[bytes, None]) -> FormData:
    """The form, parsed as it arrives (files spool to disk past 1 MB); a wrong media type is
    415, a broken form 400."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM:
        raise UnsupportedMediaTypeError(
            f"content-type {media_type or 'none'!r} is not accepted here; send {FORM}"
        )
    parser = MultiPartParser(headers, body, max_files=MAX_FILES, max_fields=MAX_FIELDS)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise MalformedRequestError(
            f"request body is not valid {FORM}: {exc.message}", code="malformed_form"
        ) from None


async def _read_form(form: FormData) -> tuple[ImagesEditRequest, Upload, Upload | None]:
    fields: dict[str, str] = {}
    images: list[UploadFile] = []
    masks: list[UploadFile] = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in FILE_FIELDS:
                raise InvalidRequestError(
                    f"unknown file field {key!r}; files go in: image, mask",
                    code="unknown_field",
                    param=key,
                )
            (images if key in IMAGE_FIELDS else masks).append(value)
        elif key in FILE_FIELDS:
            raise InvalidRequestError(
                f"{key} must be a file part (filename and bytes), not a text field",
                param=key,
            )
        elif key in fields:
            raise InvalidRequestError(f"{key} is given more than once", param=key)
        else:
            check_text(value, key)
            fields[key] = value
    if not images:
        raise InvalidRequestError(
            "image is required: upload the image to edit as a file field named image",
            code="missing_field",
            param="image",
        )
    if len(images) > 1 or len(masks) > 1:
        param = "image" if len(images) > 1 else "mask"
        raise InvalidRequestError(
            f"this server edits one image with at most one mask; got {len(images)} images and "
            f"{len(masks)} masks",
            code="unsupported_value",
            param=param,
        )
    try:
        request = ImagesEditRequest.model_validate(fields)
    except ValidationError as exc:
        raise from_validation_error(exc, ImagesEditRequest) from None
    image = await _upload(images[0])
    mask = await _upload(masks[0]) if masks else None
    return request, image, mask


async def _upload(file: UploadFile) -> Upload:
    return Upload(await file.read(), file.content_type or "")


def to_edit_generate_request(
    request: ImagesEditRequest,
    image: Upload,
    mask: Upload | None,
    config: OpenAIImagesConfig,
    limits: LimitsConfig,
    can_store: bool = False,
) -> GenerateRequest:
    """Our request for an edit: the image as `init_image`, its repaint mask if it has one."""
    init_image = image.data_url()
    decoded = decode_image(init_image, param="image", limits=limits)
    repaint = _repaint_mask(decoded, mask, limits)
    images: dict[str, Any] = {
        "init_image": init_image,
        "strength": request.strength,
        "mask_blur": request.mask_blur,
    }
    if repaint is not None:
        images["mask"] = "data:image/png;base64," + encode_image(Image.fromarray(repaint), "png")
    return to_generate_request(request, config, can_store=can_store, images=images)


def _repaint_mask(
    image: Image.Image, mask: Upload | None, limits: LimitsConfig
) -> np.ndarray | None:
    """Our mask (uint8, 255 = repaint) by OpenAI's rules, or None for a whole-image edit."""
    if mask is None:
        alpha = alpha_channel(image)
        # An image whose alpha is opaque everywhere marks nothing: it is edited as a whole.
        return None if alpha is None or not (alpha == 0).any() else _transparent(alpha)
    decoded = decode_image(mask.data_url(), param="mask", limits=limits)
    if decoded.size != image.size:
        raise _invalid_mask(
            f"mask must have the image's size, {image.width}x{image.height}; got "
            f"{decoded.width}x{decoded.height}"
        )
    alpha = alpha_channel(decoded)
    if alpha is None:
        raise _invalid_mask(
            "mask has no alpha channel; send a PNG whose fully transparent pixels mark what to edit"
        )
    if not (alpha == 0).any():
        raise _invalid_mask("mask has no fully transparent pixel, so it marks nothing to edit")
    return _transparent(alpha)


def _transparent(alpha: np.ndarray) -> np.ndarray:
    return np.where(alpha == 0, 255, 0).astype(np.uint8)


def _invalid_mask(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, code="invalid_mask", param="mask")

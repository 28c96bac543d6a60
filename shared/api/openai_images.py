"""OpenAI's Images API on top of our contract: `POST /v1/images/generations` requests (and
`/v1/images/edits`, whose form `shared.api.openai_edits` reads) become a `GenerateRequest`, and
our events become OpenAI's answer or its SSE stream (`<kind>.partial_image` from step previews
at evenly spaced steps, then `<kind>.completed`), so the official `openai` SDK works unchanged;
`url` answers store the images first. Torch-free.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import io
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, ClassVar, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.api.http_errors import to_serve_error
from shared.api.schemas import (
    ErrorEvent,
    Event,
    GenerateRequest,
    GenerateResponse,
    ResultEvent,
    StepEvent,
)
from shared.api.vocabulary import ImageFormat, SchedulerName
from shared.config import OpenAIImagesConfig
from shared.errors import InvalidRequestError, ServeError
from shared.imaging import encode_image
from shared.intake.resolve import from_validation_error, parse_request
from shared.storage import OutputStore

Quality = Literal["low", "medium", "high", "auto", "standard", "hd"]
SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


class ImagesRequest(BaseModel):
    """What `POST /v1/images/generations` and `/v1/images/edits` share: OpenAI's fields plus
    our own knobs (the SDK sends those as `extra_body`)."""

    model_config = ConfigDict(extra="forbid")
    # The prefix of OpenAI's stream event types for this route.
    stream_event: ClassVar[str]

    model: str = Field(min_length=1, max_length=200, description="Model id from /v1/models.")
    prompt: str = Field(min_length=1, description="What to draw.")
    n: int = Field(default=1, ge=1, le=64, description="Number of images.")
    size: str = Field(default="auto", description="`WIDTHxHEIGHT`, or `auto` (the model's).")
    quality: Quality = Field(default="auto", description="Steps preset (`openai_images` config).")
    output_format: ImageFormat = Field(default="png", description="Encoding of the images.")
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="JPEG/WebP quality, 0-100."
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        default=None, description="`url` needs the server's output storage configured."
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        default=None, description="`opaque` or `auto`; SDXL cannot make transparent images."
    )
    user: str | None = Field(default=None, max_length=256, description="Accepted, not stored.")
    safety_identifier: str | None = Field(default=None, max_length=256, description="Accepted.")
    stream: bool = Field(default=False, description="Stream partial images as SSE.")
    partial_images: int = Field(default=0, ge=0, le=3, description="Partial images streamed.")
    negative_prompt: str | None = Field(default=None, description="What to steer away from.")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Seed of the first image.")
    steps: int | None = Field(default=None, description="Denoising steps; overrides quality.")
    guidance_scale: float | None = Field(default=None, description="Classifier-free guidance.")
    scheduler: SchedulerName | None = Field(default=None, description="Sampler name.")


class ImagesGenerationRequest(ImagesRequest):
    """The body of `POST /v1/images/generations`."""

    stream_event: ClassVar[str] = "image_generation"

    moderation: Literal["low", "auto"] | None = Field(default=None, description="Accepted.")
    style: Literal["vivid", "natural"] | None = Field(default=None, description="Accepted.")


def parse_images_request(body: dict[str, Any]) -> ImagesGenerationRequest:
    try:
        return ImagesGenerationRequest.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc, ImagesGenerationRequest) from None


def to_generate_request(
    request: ImagesRequest,
    config: OpenAIImagesConfig,
    can_store: bool = False,
    images: dict[str, Any] | None = None,
) -> GenerateRequest:
    """Our request for an OpenAI one, with our `images` fields (an edit's init image, mask and
    strength); what we cannot honour is refused, never ignored."""
    if request.background == "transparent":
        raise InvalidRequestError(
            "background 'transparent' is not supported: SDXL makes opaque images; use 'opaque' "
            "or 'auto'",
            code="unsupported_value",
            param="background",
        )
    if request.response_format == "url" and (request.stream or not can_store):
        raise InvalidRequestError(
            "response_format 'url' needs output storage (the `storage` config) and a "
            "non-streamed request; use 'b64_json'",
            code="unsupported_value",
            param="response_format",
        )
    width, height = _size(request.size)
    steps = request.steps
    if steps is None:  # 0 is not "unset": it is refused with the other out-of-range counts
        steps = config.quality_steps.get(request.quality, config.default_steps)
    fields: dict[str, Any] = {
        "model": request.model,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "width": width,
        "height": height,
        "steps": steps,
        "seed": request.seed,
        "scheduler": request.scheduler,
        "n": request.n,
        "output_format": request.output_format,
        "stream": request.stream,
    }
    if request.guidance_scale is not None:
        fields["guidance_scale"] = request.guidance_scale
    if request.stream and request.partial_images:
        # A preview at `partial_images` evenly spaced steps before the last one.
        fields["preview"] = "full"
        fields["preview_every"] = max(1, steps // (request.partial_images + 1))
    return parse_request({**fields, **(images or {})})


def _size(size: str) -> tuple[int | None, int | None]:
    if size == "auto":
        return None, None
    match = SIZE.match(size)
    if match is None:
        raise InvalidRequestError(
            f"size must be 'auto' or WIDTHxHEIGHT like '1024x1024'; got {size!r}", param="size"
        )
    return int(match.group(1)), int(match.group(2))


def _encode(b64: str, request: ImagesRequest) -> str:
    """An image in the requested format and compression (previews arrive as JPEG)."""
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    quality = request.output_compression if request.output_compression is not None else 90
    return encode_image(image, request.output_format, quality=quality)


def _common(request: ImagesRequest, width: int, height: int) -> dict[str, Any]:
    return {
        "size": f"{width}x{height}",
        "quality": request.quality if request.quality in ("low", "medium", "high") else "auto",
        "background": "opaque",
        "output_format": request.output_format,
    }


# This server does not count tokens: OpenAI's usage block is present (the SDK's types expect
# it) and says zero.
NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


def encoded_images(request: ImagesRequest, response: GenerateResponse) -> list[str]:
    """Each image as base64 in the requested format and compression."""
    if request.output_compression is None:
        return [image.b64 for image in response.images]
    return [_encode(image.b64, request) for image in response.images]


def images_response(
    request: ImagesRequest, response: GenerateResponse, urls: list[str] | None = None
) -> dict[str, Any]:
    """OpenAI's `ImagesResponse` for a finished generation: base64 images, or their URLs."""
    first = response.images[0]
    if urls is not None:
        data = [{"url": url, "revised_prompt": request.prompt} for url in urls]
    else:
        data = [
            {"b64_json": b64, "revised_prompt": request.prompt}
            for b64 in encoded_images(request, response)
        ]
    return {
        "created": int(time.time()),
        "data": data,
        **_common(request, first.width, first.height),
        "usage": NO_USAGE,
    }


class PartialImages:
    """Turns our step events into OpenAI's partial-image events: at most `partial_images`,
    from the previews of steps before the last."""

    def __init__(self, request: ImagesRequest) -> None:
        self.request = request
        self.sent = 0

    def events(self, step: StepEvent) -> list[dict[str, Any]]:
        if not step.previews or step.index >= step.total:
            return []
        out = []
        for preview in step.previews:
            if self.sent >= self.request.partial_images:
                break
            out.append(
                {
                    "type": f"{self.request.stream_event}.partial_image",
                    "b64_json": _encode(preview.b64, self.request),
                    "created_at": int(time.time()),
                    "partial_image_index": self.sent,
                    **_common(self.request, preview.width, preview.height),
                }
            )
            self.sent += 1
        return out

    def completed(self, response: GenerateResponse) -> list[dict[str, Any]]:
        return [
            {
                "type": f"{self.request.stream_event}.completed",
                "b64_json": _encode(image.b64, self.request),
                "created_at": int(time.time()),
                "usage": NO_USAGE,
                **_common(self.request, image.width, image.height),
            }
            for image in response.images
        ]


def _openai_sse(payload: dict[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"


async def encode_openai_stream(
    first: Event,
    rest: AsyncGenerator[Event, None],
    request: ImagesRequest,
    request_id: str,
) -> AsyncIterator[str]:
    """Our events as OpenAI's image-generation SSE events; a failure is OpenAI's error event."""
    partials = PartialImages(request)

    async def events() -> AsyncIterator[Event]:
        yield first
        async for event in rest:
            yield event

    try:
        async for event in events():
            if isinstance(event, StepEvent):
                payloads = partials.events(event)
            elif isinstance(event, ResultEvent):
                payloads = partials.completed(event)
            elif isinstance(event, ErrorEvent):
                payloads = [{"type": "error", "error": event.error.model_dump()}]
            else:
                payloads = []  # queued: OpenAI's stream has no such event
            for payload in payloads:
                yield _openai_sse(payload)
    except Exception as exc:
        error = to_serve_error(exc, request_id)
        yield _openai_sse({"type": "error", "error": error.to_dict()})
    finally:
        await rest.aclose()


async def store_images(
    store: OutputStore,
    request: GenerateRequest,
    response: GenerateResponse,
    images_request: ImagesRequest,
    base_url: str,
) -> list[str]:
    """Write each image (once: keys come from the request id) with its metadata; their URLs."""
    urls = []
    for index, (image, b64) in enumerate(
        zip(response.images, encoded_images(images_request, response), strict=True)
    ):
        metadata = {
            "id": response.id,
            "model": response.model,
            "backend": response.backend,
            "index": index,
            "seed": image.seed,
            "width": image.width,
            "height": image.height,
            "format": images_request.output_format,
            # Input images stay out: the metadata describes the output, and they can be MBs.
            "request": request.model_dump(exclude={"stream", *request.image_fields}),
            "timings": response.timings.model_dump(),
        }
        data = base64.b64decode(b64)
        key = await asyncio.to_thread(
            store.save, response.id, index, data, images_request.output_format, metadata
        )
        urls.append(await asyncio.to_thread(store.url, key, base_url))
    return urls


def as_openai_error(error: InvalidRequestError) -> ServeError:
    """OpenAI answers a request that breaks a rule with 400, where our own API says 422."""
    openai_error = copy.copy(error)
    openai_error.status = 400
    return openai_error


@contextlib.contextmanager
def openai_errors() -> Iterator[None]:
    """Inside an OpenAI route: a broken rule is OpenAI's 400 (`as_openai_error`)."""
    try:
        yield
    except InvalidRequestError as exc:
        raise as_openai_error(exc) from None

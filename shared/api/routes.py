"""The public HTTP API as a FastAPI app over a `Backend`: routes, body intake, stream encoding
and the OpenAPI document; the error mapping is `shared.api.http_errors`'s.

Nothing here knows about Ray: the Router deployment is one `Backend`, and tests build the same
app around fake backends with `httpx.ASGITransport`.

No `from __future__ import annotations` here: Ray pickles the app by value, and FastAPI must
resolve the route signatures from real objects, not strings.
"""

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from shared.api.capabilities import (
    CapabilitiesResponse,
    SchedulerList,
    ValidateResponse,
    scheduler_list,
)
from shared.api.embeddings import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    check_dimensions,
    parse_embeddings_request,
)
from shared.api.http_errors import (
    check_api_key,
    error_event,
    install_error_mapping,
    request_id_of,
    to_serve_error,
)
from shared.api.openai_edits import FORM, ImagesEditRequest, edit_form_schema, edit_request
from shared.api.openai_images import (
    ImagesGenerationRequest,
    ImagesRequest,
    encode_openai_stream,
    images_response,
    openai_errors,
    parse_images_request,
    store_images,
    to_generate_request,
)
from shared.api.schemas import (
    ErrorEnvelope,
    ErrorEvent,
    Event,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    QueuedEvent,
    ResultEvent,
    StepEvent,
)
from shared.api.wire import (
    FRAME_BOUNDARY,
    FRAMES,
    NDJSON,
    SSE,
    encode_event,
    encode_frame,
    pick_stream_type,
)
from shared.config import LimitsConfig, OpenAIImagesConfig
from shared.errors import (
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from shared.intake.json_body import check_tree, parse_json_object
from shared.intake.noise_masks import pattern_catalog
from shared.intake.resolve import parse_request
from shared.storage import OutputStore

logger = logging.getLogger("ray.serve")
STATIC = Path(__file__).resolve().parent / "static"
JSON_TYPES = ("application/json",)
INLINE_PARSE_BYTES = 256 * 1024


class Backend(Protocol):
    """What the routes need from whoever serves them (the Router deployment, or a test fake).

    Every method raises only `ServeError`s for failures a client should see; anything else is
    reported as a 500 with the request id.
    """

    @property
    def limits(self) -> LimitsConfig: ...

    @property
    def openai_images(self) -> OpenAIImagesConfig: ...

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Accepted Bearer keys; empty when authentication is off."""
        ...

    @property
    def output_store(self) -> OutputStore | None:
        """Where `response_format: url` images go; None when no storage is configured."""
        ...

    async def generate_response(
        self, request: GenerateRequest, request_id: str
    ) -> GenerateResponse: ...

    def stream_events(
        self, request: GenerateRequest, request_id: str
    ) -> AsyncGenerator[Event, None]: ...

    async def validate_request(self, request: GenerateRequest, request_id: str) -> ValidateResponse:
        """The request resolved as `generate_response` would run it, and its estimate; raises
        what `generate_response` would raise for it before any work is queued."""
        ...

    async def capabilities(self) -> CapabilitiesResponse: ...

    async def create_embeddings(
        self, request: EmbeddingsRequest, request_id: str
    ) -> EmbeddingsResponse: ...

    async def list_models(self) -> list[ModelCard]: ...

    async def readiness(self) -> dict[str, Any]: ...


# ---- body intake and stream encoding ---------------------------------------------------------


async def limited_body(request: Request, max_bytes: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks, refusing an oversized body (413) before reading it whole: a declared
    length is checked first, a streamed one as it arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(
            f"request body is {int(declared)} bytes; the limit is {max_bytes}"
        )
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"request body exceeds the limit of {max_bytes} bytes")
        yield chunk


async def read_json_body(request: Request, limits: LimitsConfig) -> dict[str, Any]:
    """The JSON object body, refusing a wrong media type (415), an oversized body (413), and
    anything `parse_json_object` refuses (400/422)."""
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    media_type = media_type.lower()
    if media_type not in JSON_TYPES and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"content-type {media_type!r} is not accepted here; send application/json"
        )
    chunks = [chunk async for chunk in limited_body(request, limits.max_body_bytes)]
    body = b"".join(chunks)
    if len(body) <= INLINE_PARSE_BYTES:
        return parse_json_object(body, limits)
    # Megabytes of base64 take tens of milliseconds to parse and check; in a thread the event
    # loop gets the GIL back every switch interval (5 ms) instead of waiting for the whole body.
    return await asyncio.to_thread(parse_json_object, body, limits)


async def encode_stream(
    first: Event, rest: AsyncGenerator[Event, None], media_type: str, request_id: str
) -> AsyncIterator[str]:
    """Encode events for the wire; a failure mid-stream becomes a final `error` event."""
    try:
        yield encode_event(first, media_type)
        async for event in rest:
            yield encode_event(event, media_type)
    except Exception as exc:
        yield encode_event(error_event(to_serve_error(exc, request_id), request_id), media_type)
    finally:
        await rest.aclose()


async def encode_frames(
    first: Event, rest: AsyncGenerator[Event, None], request_id: str
) -> AsyncIterator[bytes]:
    """Events as multipart image frames; a failure mid-stream is a final JSON error part."""
    try:
        if (frame := encode_frame(first)) is not None:
            yield frame
        async for event in rest:
            if (frame := encode_frame(event)) is not None:
                yield frame
    except Exception as exc:
        error = error_event(to_serve_error(exc, request_id), request_id)
        yield encode_frame(error) or b""
    finally:
        await rest.aclose()
    yield f"--{FRAME_BOUNDARY}--\r\n".encode()


async def first_event(events: AsyncGenerator[Event, None]) -> Event:
    """The stream's first event; a failure before it closes the stream and is raised, so it
    still gets a status code (after it, it can only be an `error` event in the stream)."""
    try:
        return await anext(events)
    except BaseException:
        await events.aclose()
        raise


async def start_stream(
    backend: Backend, request: GenerateRequest, request_id: str, media_type: str
) -> StreamingResponse:
    """The streamed answer. Errors before the first event (validation, encoding,
    back-pressure) are raised, so they still get a status code; after it, they can only be an
    `error` event in the stream."""
    if media_type == FRAMES and request.preview == "none":
        request = request.model_copy(update={"preview": "latent"})  # frames need previews
    events = backend.stream_events(request, request_id)
    first = await first_event(events)
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    if media_type == FRAMES:
        return StreamingResponse(
            encode_frames(first, events, request_id),
            media_type=f"{FRAMES}; boundary={FRAME_BOUNDARY}",
            headers=headers,
        )
    return StreamingResponse(
        encode_stream(first, events, media_type, request_id), media_type=media_type, headers=headers
    )


async def answer_images(
    request: Request,
    backend: Backend,
    images_request: ImagesRequest,
    generate_request: GenerateRequest,
) -> Response:
    """An Images API route's answer (generations, edits): OpenAI's JSON (the images stored
    first for `url`), or its SSE stream."""
    request_id = request_id_of(request)
    with openai_errors():
        if not images_request.stream:
            response = await backend.generate_response(generate_request, request_id)
            urls = None
            store = backend.output_store
            if images_request.response_format == "url" and store is not None:
                urls = await store_images(
                    store, generate_request, response, images_request, str(request.base_url)
                )
            return JSONResponse(images_response(images_request, response, urls))
        events = backend.stream_events(generate_request, request_id)
        first = await first_event(events)
    return StreamingResponse(
        encode_openai_stream(first, events, images_request, request_id),
        media_type=SSE,
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


# ---- OpenAPI ---------------------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _body(media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed body (not JSON or not an object, a broken form, an unreadable image); "
        "on OpenAI's routes also a field that breaks a rule (`param` names it).",
        404: "Unknown model or route.",
        413: "Body larger than `limits.max_body_bytes`, or an image over the image limits.",
        415: "Body is not in the route's media type, or an image is not PNG, JPEG or WebP.",
        422: "A field breaks a rule or a configured limit; `param` names it.",
        429: "Every replica is busy and its queue is full; retry after `Retry-After` seconds.",
        500: "Unexpected failure; the message carries the request id.",
        503: "A backend or the model's weights are unavailable.",
    }
    return {
        status: {"description": descriptions[status], "model": ErrorEnvelope} for status in statuses
    }


_STREAM_EVENT = {
    "oneOf": [_ref(QueuedEvent), _ref(StepEvent), _ref(ResultEvent), _ref(ErrorEvent)],
    "discriminator": {"propertyName": "event"},
}


def _images_responses(kind: type[ImagesRequest]) -> dict[int | str, dict[str, Any]]:
    events = f"`{kind.stream_event}.partial_image`, `{kind.stream_event}.completed`"
    return {
        200: {"description": f"OpenAI's ImagesResponse, or with `stream: true` its SSE events "
              f"({events})."},
        **_errors(400, 404, 413, 415, 429, 500, 503),
    }  # fmt: skip


_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The images (JSON), or with `stream: true` a `queued` event, one event "
        "per step, then the result: NDJSON by default, Server-Sent Events with "
        "`accept: text/event-stream`.",
        "content": {
            "application/json": {"schema": _ref(GenerateResponse)},
            NDJSON: {"schema": _STREAM_EVENT},
            SSE: {"schema": {"type": "string", "description": "`event:` and `data:` lines."}},
        },
    },
    **_errors(400, 404, 413, 415, 422, 429, 500, 503),
}
_DOCUMENTED = (
    GenerateRequest,
    ImagesGenerationRequest,
    EmbeddingsRequest,
    GenerateResponse,
    QueuedEvent,
    StepEvent,
    ResultEvent,
    ErrorEvent,
    ErrorEnvelope,
)


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class NoiseMask(BaseModel):
    name: str = Field(description="The name a request gives as `noise_mask.pattern`.")
    description: str
    preview: str = Field(description="A 64x64 base64 PNG of the pattern, white = noise.")


class NoiseMaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[NoiseMask]


@functools.cache
def noise_mask_list() -> NoiseMaskList:
    return NoiseMaskList(data=[NoiseMask(**entry) for entry in pattern_catalog()])


SCHEDULERS = scheduler_list()


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's document plus the schemas that hand-parsed bodies and streams refer to."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _DOCUMENTED:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    return build


# ---- the app ---------------------------------------------------------------------------------


def build_api(
    get_backend: Callable[[], Backend], host_request_id: Callable[[], str] | None = None
) -> FastAPI:
    """The HTTP API; `get_backend` is a FastAPI dependency that returns the serving backend,
    `host_request_id` the request id of the server hosting the app, if it assigns one."""
    app = FastAPI(
        title="diffusion-serve",
        version="0.1.0",
        description="Image generation with every denoising step streamed back.",
        docs_url="/docs",
        redoc_url=None,
    )
    install_error_mapping(app, host_request_id)

    async def authorized(request: Request) -> Backend:
        backend = get_backend()
        check_api_key(request, backend.api_keys)
        return backend

    # Every /v1/ route takes its backend through this: no route can forget the key check.
    backend_dependency = Depends(authorized)
    open_backend = Depends(get_backend)  # health and readiness: probes carry no key

    @app.post(
        "/v1/generate",
        summary="Generate images",
        openapi_extra=_body("application/json", _ref(GenerateRequest)),
        responses=_GENERATE_RESPONSES,
        response_class=JSONResponse,
    )
    async def generate(request: Request, backend: Backend = backend_dependency) -> Response:
        # The body is parsed by hand (and declared in the OpenAPI document above) so that every
        # mistake gets our message, code and `param` rather than FastAPI's generic 422.
        request_id = request_id_of(request)
        body = await read_json_body(request, backend.limits)
        generate_request = parse_request(body)
        if not generate_request.stream:
            response = await backend.generate_response(generate_request, request_id)
            return JSONResponse(response.model_dump())
        media_type = pick_stream_type(request.headers.get("accept"))
        return await start_stream(backend, generate_request, request_id, media_type)

    @app.post(
        "/v1/generate/validate",
        summary="Validate and resolve a generation request without running it: the request "
        "with every default filled in, its images' digests, and an estimate of its cost",
        openapi_extra=_body("application/json", _ref(GenerateRequest)),
        responses={
            200: {
                "description": "The resolved request and its estimate.",
                "model": ValidateResponse,
            },
            **_errors(400, 404, 413, 415, 422, 429, 500, 503),
        },
        response_class=JSONResponse,
    )
    async def validate(request: Request, backend: Backend = backend_dependency) -> Response:
        # The same intake as POST /v1/generate, so a request refused there is refused here alike.
        body = await read_json_body(request, backend.limits)
        resolved = await backend.validate_request(parse_request(body), request_id_of(request))
        return JSONResponse(resolved.model_dump())

    @app.get(
        "/v1/capabilities",
        summary="What every model takes: tasks, samplers, previews, LoRAs, defaults, limits, "
        "batching, device and dtype",
        responses=_errors(500, 503),
    )
    async def capabilities(backend: Backend = backend_dependency) -> CapabilitiesResponse:
        return await backend.capabilities()

    @app.get(
        "/v1/schedulers",
        summary="List the sampler names `scheduler` takes, with their diffusers classes",
        responses=_errors(500),
        dependencies=[backend_dependency],
    )
    async def schedulers() -> SchedulerList:
        return SCHEDULERS

    @app.get(
        "/v1/generate",
        summary="Watch a generation in an <img> tag: the request's fields as query parameters, "
        "answered with multipart/x-mixed-replace image frames",
        responses={
            200: {"description": "A JPEG frame per step preview, then the image."},
            **_errors(404, 422, 429, 500, 503),
        },
        response_class=StreamingResponse,
    )
    async def watch(request: Request, backend: Backend = backend_dependency) -> Response:
        query = dict(request.query_params)
        check_tree(query, backend.limits)
        generate_request = parse_request({**query, "stream": True})
        return await start_stream(backend, generate_request, request_id_of(request), FRAMES)

    @app.post(
        "/v1/images/generations",
        summary="Generate images (OpenAI's Images API)",
        openapi_extra=_body("application/json", _ref(ImagesGenerationRequest)),
        responses=_images_responses(ImagesGenerationRequest),
        response_class=JSONResponse,
    )
    async def images_generations(
        request: Request, backend: Backend = backend_dependency
    ) -> Response:
        with openai_errors():
            body = await read_json_body(request, backend.limits)
            images_request = parse_images_request(body)
            can_store = backend.output_store is not None
            generate_request = to_generate_request(
                images_request, backend.openai_images, can_store=can_store
            )
        return await answer_images(request, backend, images_request, generate_request)

    @app.post(
        "/v1/images/edits",
        summary="Edit an image (OpenAI's Images API): repaint it inside a mask, or as a whole",
        openapi_extra=_body(FORM, edit_form_schema()),
        responses=_images_responses(ImagesEditRequest),
        response_class=JSONResponse,
    )
    async def images_edits(request: Request, backend: Backend = backend_dependency) -> Response:
        with openai_errors():
            body = limited_body(request, backend.limits.max_body_bytes)
            can_store = backend.output_store is not None
            edit, generate_request = await edit_request(
                request.headers, body, backend.openai_images, backend.limits, can_store
            )
        return await answer_images(request, backend, edit, generate_request)

    @app.post(
        "/v1/embeddings",
        summary="Embed text and images with the model's CLIP encoders (OpenAI's embeddings API)",
        openapi_extra=_body("application/json", _ref(EmbeddingsRequest)),
        responses={
            200: {"description": "One vector per input item.", "model": EmbeddingsResponse},
            **_errors(400, 404, 413, 415, 429, 500, 503),
        },
        response_class=JSONResponse,
    )
    async def embeddings(request: Request, backend: Backend = backend_dependency) -> Response:
        with openai_errors():
            body = await read_json_body(request, backend.limits)
            embeddings_request = parse_embeddings_request(body, backend.limits)
            response = await backend.create_embeddings(embeddings_request, request_id_of(request))
            check_dimensions(embeddings_request, response)
        return JSONResponse(response.model_dump())

    @app.get(
        "/v1/noise-masks",
        summary="List the noise-injection mask patterns a request can name",
        responses=_errors(500),
        dependencies=[backend_dependency],
    )
    async def noise_masks() -> NoiseMaskList:
        return noise_mask_list()

    @app.get(
        "/v1/files/{key:path}",
        summary="A stored image or its metadata, by a signed link this server returned",
        responses=_errors(404, 500),
        response_class=Response,
    )
    async def files(key: str, expires: int, sig: str, backend: Backend = open_backend) -> Response:
        # The signature is the credential: these links are handed to browsers and <img> tags.
        store = backend.output_store
        if store is None:
            raise NotFoundError("this server stores no files", code="file_not_found")
        data = await asyncio.to_thread(store.open_signed, key, expires, sig)
        kind = key.rsplit(".", 1)[-1]
        media_type = "application/json" if kind == "json" else f"image/{kind}"
        return Response(data, media_type=media_type, headers={"cache-control": "private"})

    @app.get("/v1/models", summary="List models", responses=_errors(500, 503))
    async def models(backend: Backend = backend_dependency) -> ModelList:
        return ModelList(data=await backend.list_models())

    # The web page: static files, no build step, nothing fetched from anywhere else.
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: 200 when every backend answers and a model can be served",
        responses={503: {"description": "Not ready; the body says which backend or models."}},
    )
    async def readyz(backend: Backend = open_backend) -> JSONResponse:
        report = await backend.readiness()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app

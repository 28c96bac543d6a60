"""The public HTTP API as a FastAPI app over a `Backend`: routes, body intake, stream encoding,
the one exception → error-envelope mapping, and the OpenAPI document.

Nothing here knows about Ray: the Router deployment is one `Backend`, and tests build the same
app around fake backends with `httpx.ASGITransport`. Every failure on every route, including
unknown routes, wrong methods and unexpected exceptions, becomes OpenAI's envelope
`{"error": {"type", "code", "message", "param"}}` with the status of its `ServeError`.

No `from __future__ import annotations` here: Ray pickles the app by value, and FastAPI must
resolve the route signatures from real objects, not strings.
"""

import asyncio
import base64
import copy
import hmac
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.api.openai_images import (
    ImagesGenerationRequest,
    PartialImages,
    encoded_images,
    images_response,
    parse_images_request,
    to_generate_request,
)
from shared.api.schemas import (
    ErrorBody,
    ErrorEnvelope,
    ErrorEvent,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    QueuedEvent,
    ResultEvent,
    StepEvent,
)
from shared.api.validation import parse_body, parse_request
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
    AuthenticationError,
    BusyError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    ServeError,
    UnsupportedMediaTypeError,
    find_serve_error,
)
from shared.storage import OutputStore

logger = logging.getLogger("ray.serve")
STATIC = Path(__file__).resolve().parent / "static"
Event = QueuedEvent | StepEvent | ResultEvent | ErrorEvent
REQUEST_ID_HEADER = "x-request-id"
BUSY_RETRY_AFTER_S = 1
JSON_TYPES = ("application/json",)


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

    async def list_models(self) -> list[ModelCard]: ...

    async def readiness(self) -> dict[str, Any]: ...


# ---- request ids and the error mapping -------------------------------------------------------


def new_request_id() -> str:
    return f"gen-{uuid.uuid4().hex[:20]}"


def _given_request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            given = value.decode("latin-1")
            if given.isprintable() and 0 < len(given) <= 64:
                return given
    return new_request_id()


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or new_request_id())


def to_serve_error(exc: BaseException, request_id: str) -> ServeError:
    """Our error inside `exc`, or a 500 that names the request id (the details go to the log)."""
    found = find_serve_error(exc)
    if found is not None:
        return found
    logger.error("request %s failed", request_id, exc_info=exc)
    return ServeError(f"internal error (request id {request_id})")


def error_response(error: ServeError) -> JSONResponse:
    headers = {}
    if isinstance(error, AuthenticationError):
        headers["www-authenticate"] = "Bearer"
    if isinstance(error, BusyError):
        headers["retry-after"] = str(BUSY_RETRY_AFTER_S)
    return JSONResponse({"error": error.to_dict()}, status_code=error.status, headers=headers)


def error_event(error: ServeError, request_id: str) -> ErrorEvent:
    return ErrorEvent(id=request_id, error=ErrorBody(**error.to_dict()))


def _http_error(request: Request, exc: StarletteHTTPException) -> ServeError:
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return NotFoundError(f"{where}: no such route; see /docs for the API")
    if exc.status_code == 405:
        allowed = _allow_header(exc) or "none"
        return MethodNotAllowedError(f"{where}: method not allowed; allowed: {allowed}")
    error = ServeError(f"{where}: {exc.detail}", code=f"http_{exc.status_code}")
    error.status = exc.status_code
    if 400 <= exc.status_code < 500:
        error.type = "invalid_request_error"
    return error


def _allow_header(exc: StarletteHTTPException) -> str:
    return next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), "")


def _validation_error(exc: RequestValidationError) -> InvalidRequestError:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    return InvalidRequestError(f"{param or 'request'}: {first.get('msg')}", param=param)


class RequestIdMiddleware:
    """Gives every request an id and turns an exception that escaped every handler into a 500
    envelope, if no response has started yet.

    The id is the host's when it has one (`host_request_id`: Serve's proxy assigns it, honours
    the client's `x-request-id` and writes it into the response itself); otherwise the client's
    `x-request-id` if sane, else a new one, and this middleware writes the header.

    A plain ASGI middleware, not Starlette's BaseHTTPMiddleware: that one re-wraps streaming
    bodies and hides a client's disconnect from the stream, which is what stops the denoiser.
    """

    def __init__(self, app: ASGIApp, host_request_id: Callable[[], str] | None = None) -> None:
        self.app = app
        self.host_request_id = host_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosted = self.host_request_id() if self.host_request_id is not None else ""
        request_id = hosted or _given_request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not hosted:
                    headers = [
                        *message.get("headers", []),
                        (REQUEST_ID_HEADER.encode(), request_id.encode()),
                    ]
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:
                raise
            response = error_response(to_serve_error(exc, request_id))
            await response(scope, receive, send_with_id)


def install_error_mapping(app: FastAPI, host_request_id: Callable[[], str] | None = None) -> None:
    """The app's one exception → envelope mapping."""

    async def serve_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServeError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        response = error_response(_http_error(request, exc))
        if exc.status_code == 405 and _allow_header(exc):
            response.headers["allow"] = _allow_header(exc)
        return response

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(_validation_error(exc))

    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(RequestIdMiddleware, host_request_id=host_request_id)


def check_api_key(request: Request, keys: tuple[str, ...]) -> None:
    """Refuse a request without one of `keys` as its Bearer token. Every key is compared, in
    constant time, so the answer's timing says nothing about how close a guess was."""
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.strip().encode(), key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise AuthenticationError("a valid API key is required: send `Authorization: Bearer <key>`")


# ---- body intake and stream encoding ---------------------------------------------------------


async def read_json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The JSON object body, refusing a wrong media type (415) or an oversized body (413)
    before reading it whole: a declared length is checked first, a streamed one as it arrives."""
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media_type.lower() not in JSON_TYPES and not media_type.lower().endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"content-type {media_type!r} is not accepted here; send application/json"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(
            f"request body is {int(declared)} bytes; the limit is {max_bytes}"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return parse_body(b"".join(chunks), max_bytes)


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


async def start_stream(
    backend: Backend, request: GenerateRequest, request_id: str, media_type: str
) -> StreamingResponse:
    """The streamed answer. Errors before the first event (validation, encoding,
    back-pressure) are raised, so they still get a status code; after it, they can only be an
    `error` event in the stream."""
    if media_type == FRAMES and request.preview == "none":
        request = request.model_copy(update={"preview": "latent"})  # frames need previews
    events = backend.stream_events(request, request_id)
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
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


def _openai_sse(payload: dict[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"


async def encode_openai_stream(
    first: Event,
    rest: AsyncGenerator[Event, None],
    request: ImagesGenerationRequest,
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
    images_request: ImagesGenerationRequest,
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
            "request": request.model_dump(exclude={"stream"}),
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


# ---- OpenAPI ---------------------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed body (not JSON, or not an object).",
        404: "Unknown model or route.",
        413: "Body larger than `limits.max_body_bytes`.",
        415: "Body is not application/json.",
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
_GENERATE_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _ref(GenerateRequest)}},
    }
}
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
        openapi_extra=_GENERATE_OPENAPI,
        responses=_GENERATE_RESPONSES,
        response_class=JSONResponse,
    )
    async def generate(request: Request, backend: Backend = backend_dependency) -> Response:
        # The body is parsed by hand (and declared in the OpenAPI document above) so that every
        # mistake gets our message, code and `param` rather than FastAPI's generic 422.
        request_id = request_id_of(request)
        body = await read_json_body(request, backend.limits.max_body_bytes)
        generate_request = parse_request(body)
        if not generate_request.stream:
            response = await backend.generate_response(generate_request, request_id)
            return JSONResponse(response.model_dump())
        media_type = pick_stream_type(request.headers.get("accept"))
        return await start_stream(backend, generate_request, request_id, media_type)

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
        generate_request = parse_request({**request.query_params, "stream": True})
        return await start_stream(backend, generate_request, request_id_of(request), FRAMES)

    @app.post(
        "/v1/images/generations",
        summary="Generate images (OpenAI's Images API)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(ImagesGenerationRequest)}},
            }
        },
        responses={
            200: {
                "description": "OpenAI's ImagesResponse, or with `stream: true` its SSE events "
                "(`image_generation.partial_image`, `image_generation.completed`)."
            },
            **_errors(400, 404, 413, 415, 429, 500, 503),
        },
        response_class=JSONResponse,
    )
    async def images_generations(
        request: Request, backend: Backend = backend_dependency
    ) -> Response:
        request_id = request_id_of(request)
        try:
            body = await read_json_body(request, backend.limits.max_body_bytes)
            images_request = parse_images_request(body)
            store = backend.output_store
            generate_request = to_generate_request(
                images_request, backend.openai_images, can_store=store is not None
            )
            if not images_request.stream:
                response = await backend.generate_response(generate_request, request_id)
                urls = None
                if images_request.response_format == "url" and store is not None:
                    urls = await store_images(
                        store, generate_request, response, images_request, str(request.base_url)
                    )
                return JSONResponse(images_response(images_request, response, urls))
            events = backend.stream_events(generate_request, request_id)
            try:
                first = await anext(events)
            except BaseException:
                await events.aclose()
                raise
        except InvalidRequestError as exc:
            raise as_openai_error(exc) from None
        return StreamingResponse(
            encode_openai_stream(first, events, images_request, request_id),
            media_type=SSE,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

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

"""Request ids, API keys and the app's one exception → error-envelope mapping: every failure on
every route, including unknown routes, wrong methods and unexpected exceptions, becomes OpenAI's
envelope `{"error": {"type", "code", "message", "param"}}` with the status of its `ServeError`.
Ray-free and torch-free; `shared.api.routes` installs it.
"""

import hmac
import logging
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.api.schemas import (
    ErrorBody,
    ErrorEvent,
)
from shared.errors import (
    AuthenticationError,
    BusyError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    ServeError,
    find_serve_error,
)

logger = logging.getLogger("ray.serve")
REQUEST_ID_HEADER = "x-request-id"
BUSY_RETRY_AFTER_S = 1


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

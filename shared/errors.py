"""The project's one error hierarchy: picklable across Ray boundaries, each with an HTTP status,
a stable machine-readable `code`, a message that teaches, and the offending `param` if any.

pydantic's ValidationError does not survive a trip through RayTaskError, so every layer converts
to these before raising out of a deployment.
"""

from __future__ import annotations

from typing import Any


class ServeError(Exception):
    """Base of every error a client may see; subclasses fix `status` and `type`."""

    status: int = 500
    type: str = "server_error"
    default_code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.code, self.param))

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's error envelope body (without the outer `error` key)."""
        return {"type": self.type, "code": self.code, "message": self.message, "param": self.param}


def _rebuild(cls: type[ServeError], message: str, code: str, param: str | None) -> ServeError:
    return cls(message, code=code, param=param)


class InvalidRequestError(ServeError):
    """The request is well-formed JSON but breaks a rule or a configured limit (422)."""

    status = 422
    type = "invalid_request_error"
    default_code = "invalid_value"


class MalformedRequestError(ServeError):
    """The body is not JSON, or not a JSON object (400)."""

    status = 400
    type = "invalid_request_error"
    default_code = "malformed_json"


class PayloadTooLargeError(ServeError):
    status = 413
    type = "invalid_request_error"
    default_code = "body_too_large"


class UnsupportedMediaTypeError(ServeError):
    """The body is not in a media type the route takes (415)."""

    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class AuthenticationError(ServeError):
    """No API key, or not one of the configured keys (401)."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class NotFoundError(ServeError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class MethodNotAllowedError(ServeError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class BusyError(ServeError):
    """Every replica that could serve the request is at capacity (429, retry later)."""

    status = 429
    type = "rate_limit_error"
    default_code = "backend_busy"


class ModelLoadError(ServeError):
    """A model's weights could not be loaded (bad checksum, missing file, refused format)."""

    status = 503
    type = "model_error"
    default_code = "model_load_failed"


class UnavailableError(ServeError):
    status = 503
    type = "server_error"
    default_code = "unavailable"


class GenerationError(ServeError):
    """The engine ran but produced no usable image (for example NaNs from an fp16 VAE)."""

    status = 500
    type = "server_error"
    default_code = "generation_failed"


class RequestCancelledError(ServeError):
    status = 499
    type = "cancelled"
    default_code = "cancelled"


def find_serve_error(exc: BaseException) -> ServeError | None:
    """Find our error inside whatever Ray wrapped it in (RayTaskError keeps it as `cause`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ServeError):
            return current
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return None

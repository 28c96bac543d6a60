"""What every provider client shares: the `ProviderClient` protocol, HTTP with the reliability
rules of `reliability.py`, error mapping, key handling and image download.

A provider module only says how our request becomes its payload, how its answer becomes images,
and how its error bodies read (`_payload`-style helpers, `_parse_error`, `_classify_error`,
`_probe_models`); everything that touches the network goes through `_call_json`, `_download` or
`_open_stream` here, so timeouts, retries, `Retry-After`, deadlines and the breaker apply alike.

Secrets: the API key is read once from the environment variable the config names, sent only in
provider-API requests (never to an image URL's host, which may be a CDN), never logged, and error
text from the provider is scrubbed of anything key-shaped.

Every client checks its base_url at construction and every image URL before downloading it
against the loopback guard of `guard.py`.
"""

from __future__ import annotations

import abc
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import httpx

from shared.api.schemas import GeneratedImage, GenerateRequest, ResultEvent, StepEvent, Timings
from shared.providers.config import ProviderConfigBase
from shared.providers.errors import (
    ProviderAuthError,
    ProviderBadResponseError,
    ProviderConfigError,
    ProviderError,
    ProviderRejectedError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    ProviderUnsupportedError,
    error_for_status,
    scrub,
)
from shared.providers.guard import check_url, loopback_only_mode
from shared.providers.reliability import (
    CircuitBreaker,
    Deadline,
    call_with_retries,
    parse_retry_after,
)

# A health probe must answer well inside Serve's health-check timeout, whatever total_s says.
PROBE_BUDGET_S = 15.0
T = TypeVar("T")


class ProviderClient(Protocol):
    """What the CloudProvider deployment (and anything else) needs from a provider client."""

    name: str

    async def generate(
        self, request: GenerateRequest, request_id: str, deadline: float | None = None
    ) -> ResultEvent: ...

    def stream(
        self, request: GenerateRequest, request_id: str, deadline: float | None = None
    ) -> AsyncIterator[StepEvent | ResultEvent]: ...

    async def probe(self) -> dict[str, Any]: ...

    def breaker_state(self) -> str: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class ErrorInfo:
    """What a provider's error body says, in its own terms."""

    message: str
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None


def requested_size(request: GenerateRequest, provider: str) -> tuple[int, int] | None:
    """(width, height) when both are set, None when neither is; one alone is refused."""
    if request.width is None and request.height is None:
        return None
    if request.width is None or request.height is None:
        missing = "width" if request.width is None else "height"
        raise ProviderUnsupportedError(
            f"provider {provider} needs both width and height, or neither for its default "
            f"size; {missing} is missing",
            param=missing,
        )
    if request.width <= 0 or request.height <= 0:
        raise ProviderRejectedError(
            f"width and height must be positive; got {request.width}x{request.height}",
            param="width" if request.width <= 0 else "height",
        )
    return request.width, request.height


def decode_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProviderBadResponseError(f"{what} is not JSON ({exc.__class__.__name__})") from None


class BaseProviderClient(abc.ABC):
    """HTTP, reliability and result assembly; subclasses add one provider's protocol.

    `config_class` is the config of the kind a subclass speaks; `shared.providers` builds its
    registry from it.
    """

    config_class: ClassVar[type[ProviderConfigBase]]

    def __init__(
        self, config: ProviderConfigBase, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.name = config.name
        self.config = config
        self._loopback_only = loopback_only_mode(config)
        check_url(config.url, self._loopback_only, f"provider {config.name} base_url")
        self._api_key = os.environ.get(config.key_env) or None
        self._breaker = CircuitBreaker.from_config(config.breaker)
        timeouts = config.timeouts
        self._http = httpx.AsyncClient(
            base_url=config.url,
            transport=transport,
            follow_redirects=False,
            timeout=httpx.Timeout(
                connect=timeouts.connect_s,
                read=timeouts.read_s,
                write=timeouts.read_s,
                pool=timeouts.connect_s,
            ),
            headers={"user-agent": "diffusion-serve"},
        )

    # -- the ProviderClient protocol ------------------------------------------------------------

    async def generate(
        self, request: GenerateRequest, request_id: str, deadline: float | None = None
    ) -> ResultEvent:
        """One request, answered with every image at once."""
        started = time.perf_counter()
        budget = self._begin(request, deadline)
        await self._preflight(request, budget)
        images = await self._generate_images(request, request_id, budget)
        return self._result(request, request_id, images, started)

    async def stream(
        self, request: GenerateRequest, request_id: str, deadline: float | None = None
    ) -> AsyncIterator[StepEvent | ResultEvent]:
        """Step events where the provider streams, then the result; providers that do not
        stream yield the result alone."""
        yield await self.generate(request, request_id, deadline)

    async def probe(self) -> dict[str, Any]:
        """Reachability, key and per-model availability; failures are reported, not raised."""
        report: dict[str, Any] = {
            "provider": self.name,
            "kind": self.config.kind,
            "base_url": self.config.url,
            "breaker": self.breaker_state(),
            "api_key": "set" if self._api_key else "missing",
        }
        unknown = dict.fromkeys(self.config.models, "unknown")
        if not self._api_key:
            return report | {"status": "no_api_key", "models": unknown, "detail": self._no_key()}
        budget = Deadline.start(None, min(self.config.timeouts.total_s, PROBE_BUDGET_S))
        try:
            models = await self._probe_models(budget)
        except ProviderError as exc:
            return report | {"status": _probe_status(exc), "models": unknown, "detail": exc.message}
        return report | {"status": _models_status(models), "models": models, "detail": None}

    def breaker_state(self) -> str:
        return self._breaker.state()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- hooks for provider modules -------------------------------------------------------------

    @abc.abstractmethod
    async def _generate_images(
        self, request: GenerateRequest, request_id: str, budget: Deadline
    ) -> list[GeneratedImage]:
        """One attempt at the provider's API; retries and the breaker wrap it."""

    @abc.abstractmethod
    async def _probe_models(self, budget: Deadline) -> dict[str, str]:
        """Each configured model → "available" | "unsupported" | "unknown"."""

    async def _preflight(self, request: GenerateRequest, budget: Deadline) -> None:
        """Checks before any paid request (Parasail's capability probe); none by default."""
        return None

    def _auth_headers(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    def _parse_error(self, body: Any) -> ErrorInfo | None:
        """The provider's error body in its own terms, or None if it is not its error shape."""
        return None

    def _classify_error(self, status: int, info: ErrorInfo) -> type[ProviderError] | None:
        """A provider-specific error class (quota, content filter, ...) or None for the
        status-based default."""
        return None

    # -- HTTP with reliability ------------------------------------------------------------------

    def _begin(self, request: GenerateRequest, deadline: float | None) -> Deadline:
        """Checks every call makes before touching the network, and its time budget."""
        if request.model not in self.config.models:
            raise ProviderUnsupportedError(
                f"provider {self.name} does not serve model {request.model!r}; it serves "
                f"{', '.join(self.config.models)}",
                param="model",
            )
        if not self._api_key:
            raise ProviderAuthError(self._no_key())
        return Deadline.start(deadline, self.config.timeouts.total_s)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], budget: Deadline) -> T:
        return await call_with_retries(
            attempt,
            provider=self.name,
            policy=self.config.retries,
            breaker=self._breaker,
            deadline=budget,
        )

    async def _call_json(
        self,
        method: str,
        path: str,
        budget: Deadline,
        payload: Any = None,
        *,
        payload_for_attempt: Callable[[], Any] | None = None,
    ) -> Any:
        """A provider API call with retries and the breaker; the decoded JSON answer.

        `payload_for_attempt`, when given, builds the payload afresh for every attempt, for
        providers that want each attempt to be a new task (Runware's per-task taskUUID).
        """

        async def attempt() -> Any:
            body = await self._send(
                method, path, payload_for_attempt() if payload_for_attempt else payload
            )
            return decode_json(body, f"provider {self.name} answer")

        return await self._retrying(attempt, budget)

    async def _call_json_once(self, method: str, path: str, budget: Deadline) -> Any:
        """A single attempt outside the breaker, for probes: health checks must not trip it."""

        async def attempt() -> Any:
            return decode_json(await self._send(method, path), f"provider {self.name} answer")

        return await budget.run(attempt, f"provider {self.name} probe")

    async def _download(self, url: str, budget: Deadline) -> bytes:
        """Bytes of an image URL from the provider's answer (no API key goes with it)."""
        try:
            check_url(url, self._loopback_only, f"provider {self.name} image URL")
        except ProviderConfigError as exc:
            raise ProviderBadResponseError(exc.message) from None
        return await self._retrying(lambda: self._send("GET", url, auth=False), budget)

    @asynccontextmanager
    async def _open_stream(
        self, path: str, payload: Any, budget: Deadline
    ) -> AsyncIterator[httpx.Response]:
        """A streaming POST whose status was 2xx; retries happen before the first byte only."""
        response = await self._retrying(
            lambda: self._start_checked("POST", path, payload, auth=True), budget
        )
        try:
            yield response
        except ProviderError as exc:
            # The opening attempt was recorded healthy; a fault mid-stream still counts.
            if exc.provider_fault:
                self._breaker.note_failure()
            raise
        finally:
            await response.aclose()

    async def _stream_lines(self, response: httpx.Response, budget: Deadline) -> AsyncIterator[str]:
        """Lines of an open stream, each read bounded by the deadline; failures are mapped."""
        lines = response.aiter_lines()
        while True:
            try:
                line = await budget.run(lambda: anext(lines, None), f"provider {self.name} stream")
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise self._transport_error(exc) from None
            if line is None:
                return
            yield line

    async def _send(
        self, method: str, url: str, payload: Any = None, *, auth: bool = True
    ) -> bytes:
        """One HTTP exchange: the body of a 2xx answer, or the mapped `ProviderError`."""
        response = await self._start_checked(method, url, payload, auth=auth)
        try:
            return await self._read_body(response)
        finally:
            await response.aclose()

    async def _start_checked(
        self, method: str, url: str, payload: Any, *, auth: bool
    ) -> httpx.Response:
        """An open response with a 2xx status; any other status is read, closed and raised."""
        response = await self._start(method, url, payload, auth=auth)
        if response.status_code < 300:
            return response
        try:
            body = await self._read_body(response)
        finally:
            await response.aclose()
        raise self._error_from_response(response, body)

    async def _start(self, method: str, url: str, payload: Any, *, auth: bool) -> httpx.Response:
        headers = self._auth_headers(self._api_key or "") if auth else {}
        request = self._http.build_request(method, url, json=payload, headers=headers)
        try:
            return await self._http.send(request, stream=True)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise self._transport_error(exc) from None

    async def _read_body(self, response: httpx.Response) -> bytes:
        limit = self.config.max_response_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ProviderBadResponseError(
                        f"provider {self.name} answer exceeds max_response_bytes ({limit})"
                    )
                chunks.append(chunk)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise self._transport_error(exc) from None
        return b"".join(chunks)

    # -- mapping --------------------------------------------------------------------------------

    def _transport_error(self, exc: Exception) -> ProviderError:
        detail = scrub(str(exc) or exc.__class__.__name__, self._api_key)
        if isinstance(exc, httpx.TimeoutException):
            return ProviderTimeoutError(
                f"provider {self.name} timed out ({exc.__class__.__name__}: {detail})"
            )
        if isinstance(exc, httpx.DecodingError):
            return ProviderBadResponseError(f"provider {self.name} sent an undecodable body")
        return ProviderUnavailableError(
            f"provider {self.name} is unreachable ({exc.__class__.__name__}: {detail})"
        )

    def _error_from_response(self, response: httpx.Response, body: bytes) -> ProviderError:
        status = response.status_code
        info = self._error_info(status, body)
        if status < 400:
            return ProviderBadResponseError(
                f"provider {self.name} answered HTTP {status} (redirects are not followed)"
            )
        cls = self._classify_error(status, info) or error_for_status(status)
        retry_after = _retry_after(response.headers)
        if retry_after is None:
            retry_after = info.retry_after
        return cls(
            self._failure_message(status, info, cls), param=info.param, retry_after=retry_after
        )

    def _error_info(self, status: int, body: bytes) -> ErrorInfo:
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        info = self._parse_error(parsed) if parsed is not None else None
        if info is not None:
            return info
        text = body.decode("utf-8", "replace").strip()
        return ErrorInfo(message=text or f"HTTP {status} with an empty body")

    def _failure_message(self, status: int, info: ErrorInfo, cls: type[ProviderError]) -> str:
        code = f", {info.code}" if info.code else ""
        head = f"provider {self.name} answered HTTP {status}{code}"
        if issubclass(cls, ProviderAuthError):
            # Auth failures may quote (part of) the key back; say where the key comes from instead.
            return f"{head}: the API key in ${self.config.key_env} was refused"
        return f"{head}: {scrub(info.message, self._api_key)}"

    def _no_key(self) -> str:
        return (
            f"provider {self.name} has no API key: environment variable "
            f"{self.config.key_env} is not set"
        )

    def _result(
        self,
        request: GenerateRequest,
        request_id: str,
        images: list[GeneratedImage],
        started: float,
    ) -> ResultEvent:
        if not images:
            raise ProviderBadResponseError(f"provider {self.name} answered without an image")
        total_ms = (time.perf_counter() - started) * 1000
        return ResultEvent(
            id=request_id,
            model=request.model,
            backend=self.name,
            images=images,
            timings=Timings(total_ms=total_ms),
        )


def _retry_after(headers: httpx.Headers) -> float | None:
    """`Retry-After`, or OpenAI's finer-grained `retry-after-ms` when present."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def _models_status(models: dict[str, str]) -> str:
    """ok unless a model is known to be unsupported: degraded for some, unsupported for all."""
    unsupported = sum(state == "unsupported" for state in models.values())
    if unsupported == 0:
        return "ok"
    return "unsupported" if unsupported == len(models) else "degraded"


def _probe_status(exc: ProviderError) -> str:
    if isinstance(exc, ProviderAuthError):
        return "auth_failed"
    if isinstance(exc, ProviderUnsupportedError):
        return "unsupported"
    return "unreachable"

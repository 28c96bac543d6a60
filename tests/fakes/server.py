"""The machinery every fake provider shares: a loopback HTTP server, call records, faults.

A fake is a Starlette app served by uvicorn in a daemon thread on 127.0.0.1 and a free port. Tests
(and, later, Ray Serve end-to-end tests) point a provider client at `fake.url`. The fake records
every request in `fake.calls`, validates it the way the real API would, and answers in the real
API's shapes. Faults queued with `inject` (or made permanent with `always`) apply to the
generation endpoint, one per request, before authentication — the way a load balancer in front
of the real API fails:

- `Fault.status_code(503)` / `Fault.rate_limit(retry_after="1")`: the provider's error body for that
  status (429 with `Retry-After`);
- `Fault.delay(s)`: answer normally, `s` seconds late;
- `Fault.blackhole()`: accept the request and never answer (until the fake stops);
- `Fault.malformed()`: 200 with a truncated JSON body;
- `Fault.content_filter()` and `Fault.special(kind, ...)`: provider-specific answers, rendered
  after validation by the fake that knows them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

GENERIC_FAULTS = {"status", "rate_limit", "delay", "blackhole", "malformed"}


@dataclass(frozen=True)
class Call:
    """One request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(repr=False)


@dataclass(frozen=True)
class Fault:
    """Something going wrong with one request to the generation endpoint."""

    kind: str
    status: int | None = None
    retry_after: str | None = None
    seconds: float = 0.0
    text: str | None = None

    @classmethod
    def status_code(cls, status: int, retry_after: str | None = None) -> Fault:
        return cls("status", status=status, retry_after=retry_after)

    @classmethod
    def rate_limit(cls, retry_after: str | None = "1") -> Fault:
        return cls("rate_limit", status=429, retry_after=retry_after)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        return cls("delay", seconds=seconds)

    @classmethod
    def blackhole(cls) -> Fault:
        return cls("blackhole")

    @classmethod
    def malformed(cls) -> Fault:
        return cls("malformed")

    @classmethod
    def content_filter(cls) -> Fault:
        return cls("content_filter")

    @classmethod
    def special(cls, kind: str, text: str | None = None) -> Fault:
        return cls(kind, text=text)


class LoopbackServer:
    """uvicorn serving one ASGI app on 127.0.0.1:<free port> from a daemon thread."""

    def __init__(self, app: Starlette, name: str) -> None:
        self._app = app
        self._name = name
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.stopping = threading.Event()

    def start(self, timeout_s: float = 10.0) -> None:
        # Binding the socket ourselves gives a free port with no race between pick and bind.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, lifespan="off", ws="auto"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=self._name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fake server {self._name} did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)


class FakeProvider:
    """Base of the fakes: lifecycle, call records, fault queue, config for the client under test.

    Subclasses set `kind`, `default_models`, build their `routes()` and render errors in their
    provider's shape with `error_response`.
    """

    kind: ClassVar[str]
    default_models: ClassVar[list[str]]
    special_faults: ClassVar[set[str]] = set()

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        models: list[str] | None = None,
    ) -> None:
        self.api_key = api_key or f"fake-{self.kind}-key-{uuid.uuid4().hex[:12]}"
        self.api_key_env = api_key_env or f"FAKE_{self.kind.upper()}_API_KEY"
        self.models = list(models or self.default_models)
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._always: Fault | None = None
        self._files: dict[str, tuple[bytes, str]] = {}
        routes = [*self.routes(), Route("/files/{name}", self._file, methods=["GET"])]
        self._server = LoopbackServer(Starlette(routes=routes), f"fake-{self.kind}")

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    def start(self) -> FakeProvider:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FakeProvider:
        if not self._server.port:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- test controls --------------------------------------------------------------------------

    def inject(self, *faults: Fault, times: int = 1) -> None:
        """Queue `faults` (each `times` times, in order) for the next generation requests."""
        for fault in faults:
            self._check_fault(fault)
        with self._lock:
            for fault in faults:
                self._faults.extend([fault] * times)

    def always(self, fault: Fault | None) -> None:
        """Apply `fault` to every generation request once the queue is empty (None stops)."""
        if fault is not None:
            self._check_fault(fault)
        self._always = fault

    def reset(self) -> None:
        """Forget calls and faults (between tests sharing one fake)."""
        with self._lock:
            self.calls.clear()
            self._faults.clear()
            self._always = None

    def calls_to(self, path_part: str) -> list[Call]:
        return [call for call in list(self.calls) if path_part in call.path]

    def wait_for_calls(self, count: int, path_part: str = "", timeout_s: float = 5.0) -> list[Call]:
        """Block until `count` calls whose path contains `path_part` arrived (or fail)."""
        deadline = time.monotonic() + timeout_s
        while len(calls := self.calls_to(path_part)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} calls to {path_part!r}; saw {len(calls)}")
            time.sleep(0.005)
        return calls

    @property
    def env(self) -> dict[str, str]:
        """Environment the client's process needs (its API key)."""
        return {self.api_key_env: self.api_key}

    def config(self, name: str | None = None) -> dict[str, Any]:
        """A `ProviderConfig`-shaped dict pointing at this fake, loopback-only."""
        return {
            "name": name or self.kind,
            "kind": self.kind,
            "base_url": self.url,
            "api_key_env": self.api_key_env,
            "models": self.served_models(),
            "allow_remote": False,
        }

    def served_models(self) -> list[str]:
        """The models a client configuration should list for this fake."""
        return list(self.models)

    # -- for subclasses -------------------------------------------------------------------------

    def routes(self) -> Sequence[BaseRoute]:
        raise NotImplementedError

    def error_response(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        raise NotImplementedError

    def rate_limit_response(self, fault: Fault) -> Response:
        headers = {"retry-after": fault.retry_after} if fault.retry_after else None
        return self.error_response(429, "Rate limit reached; slow down.", headers=headers)

    async def record(self, request: Request) -> Call:
        return self.record_raw(
            request.method, request.url.path, dict(request.headers), await request.body()
        )

    def record_raw(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Call:
        """Record one request (or WebSocket message) with its body decoded when it is JSON."""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw
        call = Call(
            method=method,
            path=path,
            headers={k.lower(): v for k, v in headers.items()},
            body=body,
            at=time.monotonic(),
        )
        with self._lock:
            self.calls.append(call)
        return call

    async def take_fault(self, request: Request) -> tuple[Fault | None, Response | None]:
        """The next fault, and the response that ends the request if it is a generic one."""
        with self._lock:
            fault = self._faults.popleft() if self._faults else self._always
        if fault is None:
            return None, None
        if fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
            return fault, None
        if fault.kind == "blackhole":
            # Never answer; let go only when the client gives up or the fake stops.
            while not self._server.stopping.is_set() and not await request.is_disconnected():
                await asyncio.sleep(0.02)
            return fault, Response(status_code=503)
        if fault.kind == "malformed":
            return fault, Response(b'{"data": [{"b64_json": "iVBOR', media_type="application/json")
        if fault.kind == "rate_limit":
            return fault, self.rate_limit_response(fault)
        if fault.kind == "status":
            assert fault.status is not None
            headers = {"retry-after": fault.retry_after} if fault.retry_after else None
            return fault, self.error_response(
                fault.status, _status_reason(fault.status), headers=headers
            )
        return fault, None

    def store_file(self, data: bytes, media_type: str, ext: str) -> str:
        """Serve `data` under /files/ (for URL outputs) and return its URL."""
        name = f"{uuid.uuid4().hex}.{ext}"
        self._files[name] = (data, media_type)
        return f"{self.url}/files/{name}"

    async def _file(self, request: Request) -> Response:
        await self.record(request)
        stored = self._files.get(request.path_params["name"])
        if stored is None:
            return Response(b"Not Found", status_code=404)
        return Response(stored[0], media_type=stored[1])

    def _check_fault(self, fault: Fault) -> None:
        if fault.kind not in GENERIC_FAULTS | self.special_faults:
            known = sorted(GENERIC_FAULTS | self.special_faults)
            raise ValueError(f"fake {self.kind} knows faults {known}; got {fault.kind!r}")


def _status_reason(status: int) -> str:
    reasons = {
        500: "The server had an error while processing your request.",
        502: "Bad gateway.",
        503: "The service is temporarily overloaded.",
        504: "Gateway timeout.",
        408: "Request timeout.",
    }
    return reasons.get(status, f"Injected failure (HTTP {status}).")

"""Router: the only HTTP ingress, and the handle API other Ray apps call.

It validates requests at the edge, picks the backend by `model`, asks ClipEncoder for embeddings,
streams SDXLPipeline's events back (JSON, NDJSON or SSE), and maps every failure onto one error
envelope. It holds no model and imports no torch.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.config import AppConfig, ModelConfig
from shared.errors import (
    BusyError,
    InvalidRequestError,
    NotFoundError,
    ServeError,
    UnavailableError,
    find_serve_error,
)
from shared.providers.config import ProviderConfig
from shared.samplers import SCHEDULER_NAMES
from shared.schemas import (
    DenoiseJob,
    ErrorBody,
    ErrorEvent,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ResultEvent,
    StepEvent,
)
from shared.streaming import encode_event, pick_stream_type
from shared.validation import check_remote_request, parse_body, parse_request, resolve_request

logger = logging.getLogger("ray.serve")
READY_TIMEOUT_S = 5.0
BUSY_RETRY_AFTER_S = 1

Event = StepEvent | ResultEvent | ErrorEvent
app = FastAPI(title="diffusion-serve", version="0.1.0", docs_url="/docs", redoc_url=None)


async def _encode_stream(
    first: Event, rest: AsyncGenerator[Event, None], media_type: str, request_id: str
) -> AsyncIterator[str]:
    """Encode events for the wire; a failure mid-stream becomes a final `error` event."""
    yield encode_event(first, media_type)
    try:
        async for event in rest:
            yield encode_event(event, media_type)
    except Exception as exc:
        yield encode_event(_error_event(_to_serve_error(exc, request_id), request_id), media_type)
    finally:
        await rest.aclose()


async def _ping(handle: DeploymentHandle, method: str = "ping") -> str:
    try:
        return await asyncio.wait_for(getattr(handle, method).remote(), READY_TIMEOUT_S)
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"


def _to_serve_error(exc: BaseException, request_id: str) -> ServeError:
    found = find_serve_error(exc)
    if found is not None:
        return found
    if isinstance(exc, BackPressureError):
        return BusyError(
            f"every replica is busy and the queue is full; retry in {BUSY_RETRY_AFTER_S} s"
        )
    if isinstance(exc, DeploymentUnavailableError):
        return UnavailableError("a backend deployment is unavailable; retry later")
    logger.exception("request %s failed", request_id, exc_info=exc)
    return ServeError(f"internal error (request id {request_id})")


def _error_response(error: ServeError, request_id: str) -> JSONResponse:
    headers = {}
    if isinstance(error, BusyError):
        headers["retry-after"] = str(BUSY_RETRY_AFTER_S)
    return JSONResponse({"error": error.to_dict()}, status_code=error.status, headers=headers)


def _finish(event: Event, model: str, started: float, encode_ms: float) -> Event:
    """Stamp a result with the model id the client asked for and the end-to-end timings."""
    if isinstance(event, ResultEvent):
        event.model = model
        event.timings.encode_ms = encode_ms
        event.timings.total_ms = (time.time() - started) * 1000
    return event


def _error_event(error: ServeError, request_id: str) -> ErrorEvent:
    return ErrorEvent(id=request_id, error=ErrorBody(**error.to_dict()))


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if given.isprintable() and 0 < len(given) <= 64 else _new_request_id()


def _new_request_id() -> str:
    return f"gen-{uuid.uuid4().hex[:20]}"


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = NotFoundError(f"{request.method} {request.url.path}: {exc.detail}")
    error.status = exc.status_code
    return _error_response(error, _request_id(request))


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    def __init__(
        self,
        config: AppConfig,
        encoder: DeploymentHandle,
        pipeline: DeploymentHandle,
        cache: DeploymentHandle,
        providers: dict[str, DeploymentHandle] | None = None,
    ) -> None:
        self._config = config
        self._local: dict[str, ModelConfig] = {m.id: m for m in config.models}
        self._encoder = encoder
        self._pipeline = pipeline
        self._cache = cache
        self._providers = providers or {}

    # ---- HTTP API -------------------------------------------------------------------------

    @app.post("/v1/generate")
    async def http_generate(self, request: Request) -> Response:
        request_id = _request_id(request)
        try:
            body = parse_body(await request.body(), self._config.limits.max_body_bytes)
            generate = parse_request(body)
            if not generate.stream:
                response = await self._generate(generate, request_id)
                return JSONResponse(response.model_dump())
            media_type = pick_stream_type(request.headers.get("accept"))
            events = self._events(generate, request_id, streaming=True)
            # Errors before the first event (validation, encoding, back-pressure) still get a
            # real status code; after it, they can only be an `error` event in the stream.
            first = await anext(events)
        except Exception as exc:
            return _error_response(_to_serve_error(exc, request_id), request_id)
        return StreamingResponse(
            _encode_stream(first, events, media_type, request_id),
            media_type=media_type,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    @app.get("/v1/models")
    async def http_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [card.model_dump() for card in await self.models()]}

    @app.get("/healthz")
    async def http_healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def http_readyz(self) -> JSONResponse:
        report = await self.readiness()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    # ---- handle API (other Ray apps) ------------------------------------------------------

    async def generate(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """Generate and return the whole response; raises a ServeError subclass on failure."""
        request_id = _new_request_id()
        try:
            return await self._generate(parse_request(request), request_id)
        except Exception as exc:
            raise _to_serve_error(exc, request_id) from None

    async def stream(self, request: GenerateRequest | dict[str, Any]) -> AsyncIterator[Event]:
        """Yield StepEvents then a ResultEvent; a failure is the last event, an ErrorEvent."""
        request_id = _new_request_id()
        try:
            async for event in self._events(parse_request(request), request_id, streaming=True):
                yield event
        except Exception as exc:
            yield _error_event(_to_serve_error(exc, request_id), request_id)

    async def models(self) -> list[ModelCard]:
        states = await self._cache.status.remote()
        local = [
            ModelCard(
                id=model.id,
                backend="local",
                loaded=states.get(model.id, {}).get("state") == "cached",
                state=states.get(model.id, {}),
            )
            for model in self._config.models
        ]
        breakers = await self._breakers()
        remote = [
            ModelCard(
                id=f"{provider.name}/{name}",
                backend=provider.name,
                loaded=True,
                state={"breaker": breakers[provider.name]},
            )
            for provider in self._config.providers
            for name in provider.models
        ]
        return local + remote

    async def _breakers(self) -> dict[str, str]:
        names = list(self._providers)
        states = await asyncio.gather(*(_ping(self._providers[n], "breaker_state") for n in names))
        return dict(zip(names, states, strict=True))

    async def readiness(self) -> dict[str, Any]:
        checks = {
            "ClipEncoder": self._encoder,
            "SDXLPipeline": self._pipeline,
            "ModelCache": self._cache,
        }
        results = await asyncio.gather(*(_ping(h) for h in checks.values()))
        backends = dict(zip(checks, results, strict=True))
        models = (
            {card.id: card.state for card in await self.models()}
            if backends["ModelCache"] == "ok"
            else {}
        )
        # A model that failed to load, like a provider with an open breaker, does not make the
        # server unready (that would take every other model out of service too): it is listed.
        # Only a server with nothing left to serve is unready.
        failed = sorted(model for model, s in models.items() if s.get("state") == "failed")
        servable = bool(self._providers) or len(failed) < len(self._config.models)
        return {
            "ready": all(r == "ok" for r in results) and servable,
            "backends": backends,
            "models": models,
            "failed_models": failed,
            "providers": await self._breakers(),
        }

    # ---- internals ------------------------------------------------------------------------

    async def _generate(self, request: GenerateRequest, request_id: str) -> GenerateResponse:
        async for event in self._events(request, request_id):
            if isinstance(event, ResultEvent):
                return event.to_response()
        raise UnavailableError("the backend finished without a result")

    async def _events(
        self, request: GenerateRequest, request_id: str, streaming: bool = False
    ) -> AsyncGenerator[Event, None]:
        started = time.time()
        remote = self._config.provider_model(request.model)
        if remote is not None:
            check_remote_request(request, self._config.limits)
            events = self._provider_events(request, remote, request_id, streaming, started)
        else:
            events = self._local_events(request, request_id, streaming, started)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    async def _local_events(
        self, request: GenerateRequest, request_id: str, streaming: bool, started: float
    ) -> AsyncGenerator[Event, None]:
        model = self._model(request.model)
        request = resolve_request(request, model, self._config.limits, SCHEDULER_NAMES)
        job = await self._prepare_job(request, model, request_id, started)
        if not streaming:  # nobody would see the previews
            job.preview = "none"
        events = self._pipeline.options(stream=True, multiplexed_model_id=model.id).stream.remote(
            job
        )
        try:
            try:
                first = await anext(events)
            except BackPressureError:
                fallback = self._config.provider_model(model.fallback or "")
                if fallback is None:
                    raise
                # Local replicas push back: spill over to the configured provider model.
                spilled = self._provider_events(
                    request, fallback, request_id, streaming, started, spilled_over=True
                )
                async for event in spilled:
                    yield event
                return
            yield _finish(first, request.model, started, job.timings["encode_ms"])
            async for event in events:
                yield _finish(event, request.model, started, job.timings["encode_ms"])
        finally:
            events.cancel()

    async def _provider_events(
        self,
        request: GenerateRequest,
        remote: tuple[ProviderConfig, str],
        request_id: str,
        streaming: bool,
        started: float,
        spilled_over: bool = False,
    ) -> AsyncGenerator[Event, None]:
        provider, model_name = remote
        forwarded = request.model_copy(
            update={"model": model_name, "preview": request.preview if streaming else "none"}
        )
        deadline = started + provider.timeouts.total_s
        handle = self._providers[provider.name].options(stream=True)
        events = handle.stream.remote(forwarded, request_id, deadline)
        try:
            async for event in events:
                if isinstance(event, ResultEvent):
                    event.spilled_over = spilled_over
                yield _finish(event, request.model, started, 0.0)
        finally:
            events.cancel()

    async def _prepare_job(
        self, request: GenerateRequest, model: ModelConfig, request_id: str, started: float
    ) -> DenoiseJob:
        assert request.seed is not None and request.width and request.height and request.steps
        embeddings = await self._encoder.encode.remote(
            model.id, request.prompt, request.negative_prompt
        )
        return DenoiseJob(
            id=request_id,
            model=model.id,
            embeddings=embeddings,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            seeds=[request.seed + i for i in range(request.n)],
            scheduler=request.scheduler,
            preview=request.preview,
            preview_every=request.preview_every,
            preview_max_side=self._config.limits.preview_max_side,
            output_format=request.output_format,
            created_at=time.time(),
            timings={"encode_ms": (time.time() - started) * 1000},
        )

    def _model(self, model_id: str) -> ModelConfig:
        model = self._local.get(model_id)
        if model is None:
            remote = [f"{p.name}/{m}" for p in self._config.providers for m in p.models]
            known = ", ".join(sorted(self._local) + remote)
            raise InvalidRequestError(
                f"unknown model {model_id!r}; available models: {known}",
                code="model_not_found",
                param="model",
            )
        return model

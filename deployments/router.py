"""Router: the only HTTP ingress, and the handle API other Ray apps call.

The HTTP routes are `shared.api.routes` over this deployment as their `Backend`. The Router picks
the backend by `model`, asks ClipEncoder for embeddings, streams SDXLPipeline's (or a
CloudProvider's) events back, and turns Ray's failures into the project's errors. It holds no
model and imports no torch.

No `from __future__ import annotations`: Ray pickles this module's class and FastAPI app by value.
"""

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from shared.api.embeddings import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    embeddings_response,
    is_image_input,
    parse_embeddings_request,
)
from shared.api.http_errors import (
    BUSY_RETRY_AFTER_S,
    error_event,
    new_request_id,
    to_serve_error,
)
from shared.api.images import decode_image, rgb_pixels
from shared.api.jobs import DenoiseJob
from shared.api.request_images import (
    DecodedImages,
    decode_images,
    image_prompt_pixels,
    job_images,
    with_image_size,
)
from shared.api.routes import Backend, build_api
from shared.api.schemas import Event, GenerateRequest, GenerateResponse, ModelCard, ResultEvent
from shared.api.validation import check_remote_request, parse_request, resolve_request
from shared.config import AppConfig, LimitsConfig, ModelConfig, OpenAIImagesConfig
from shared.errors import BusyError, InvalidRequestError, ServeError, UnavailableError
from shared.providers.config import ProviderConfigBase
from shared.storage import OutputStore

logger = logging.getLogger("ray.serve")
READY_TIMEOUT_S = 5.0


def _this_router() -> Backend:
    """The replica's Router instance: how Serve itself hands `self` to class-based routes."""
    return serve.get_replica_context().servable_object


def _serve_request_id() -> str:
    """Serve's id for the request being handled: the client's `x-request-id` or the proxy's own,
    which the proxy also writes into the response. Read from Serve's request context (no public
    accessor exists in Ray 2.60); empty outside a request."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


app = build_api(_this_router, host_request_id=_serve_request_id)


def _from_ray(exc: BaseException, request_id: str) -> ServeError:
    """Ray's failures as the project's errors; anything unknown is a 500 naming the request."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, BackPressureError):
        return BusyError(
            f"every replica is busy and the queue is full; retry in {BUSY_RETRY_AFTER_S} s"
        )
    if isinstance(exc, DeploymentUnavailableError | RayActorError):
        return UnavailableError("a backend deployment is unavailable; retry later")
    return to_serve_error(exc, request_id)


def _output_store(config: AppConfig) -> OutputStore | None:
    storage = config.storage
    if storage is None:
        return None
    secret = os.environ.get(storage.signing_key_env or "", "").encode() or secrets.token_bytes(32)
    return OutputStore(storage, secret)


async def _ping(handle: DeploymentHandle, method: str = "ping") -> str:
    try:
        return await asyncio.wait_for(getattr(handle, method).remote(), READY_TIMEOUT_S)
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"


def _embedding_items(request: EmbeddingsRequest, limits: LimitsConfig) -> list[Any]:
    """Texts as they are, `data:image/` items decoded by the intake to uint8 RGB."""
    items: list[Any] = []
    for index, item in enumerate(request.inputs):
        if is_image_input(item):
            param = "input" if isinstance(request.input, str) else f"input.{index}"
            items.append(rgb_pixels(decode_image(item, param=param, limits=limits)))
        else:
            items.append(item)
    return items


def _finish(event: Event, model: str, started: float, encode_ms: float) -> Event:
    """Stamp a result with the model id the client asked for and the end-to-end timings."""
    if isinstance(event, ResultEvent):
        event.model = model
        event.timings.encode_ms = encode_ms
        event.timings.total_ms = (time.time() - started) * 1000
    return event


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
        self._checkpoint_sizes: dict[str, tuple[int, int]] = {}
        self._api_keys = config.auth.load_keys()
        self._store = _output_store(config)

    # ---- handle API (other Ray apps) ------------------------------------------------------

    async def generate(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """Generate and return the whole response; raises a ServeError subclass on failure."""
        return await self.generate_response(parse_request(request), new_request_id())

    async def stream(self, request: GenerateRequest | dict[str, Any]) -> AsyncIterator[Event]:
        """Yield StepEvents then a ResultEvent; a failure is the last event, an ErrorEvent."""
        request_id = new_request_id()
        try:
            async for event in self.stream_events(parse_request(request), request_id):
                yield event
        except ServeError as exc:
            yield error_event(exc, request_id)

    async def models(self) -> list[ModelCard]:
        return await self.list_models()

    async def embeddings(self, request: EmbeddingsRequest | dict[str, Any]) -> EmbeddingsResponse:
        """CLIP embeddings of texts and images, as POST /v1/embeddings answers them."""
        if not isinstance(request, EmbeddingsRequest):
            request = parse_embeddings_request(request, self._config.limits)
        return await self.create_embeddings(request, new_request_id())

    # ---- Backend (the HTTP routes call these) ---------------------------------------------

    @property
    def limits(self) -> LimitsConfig:
        return self._config.limits

    @property
    def openai_images(self) -> OpenAIImagesConfig:
        return self._config.openai_images

    @property
    def api_keys(self) -> tuple[str, ...]:
        return self._api_keys

    @property
    def output_store(self) -> OutputStore | None:
        return self._store

    async def generate_response(
        self, request: GenerateRequest, request_id: str
    ) -> GenerateResponse:
        async for event in self.stream_events(request, request_id, streaming=False):
            if isinstance(event, ResultEvent):
                return event.to_response()
        raise UnavailableError("the backend finished without a result")

    async def stream_events(
        self, request: GenerateRequest, request_id: str, streaming: bool = True
    ) -> AsyncGenerator[Event, None]:
        """The request's events; every failure is raised as a ServeError."""
        started = time.time()
        try:
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
        except Exception as exc:
            raise _from_ray(exc, request_id) from None

    async def create_embeddings(
        self, request: EmbeddingsRequest, request_id: str
    ) -> EmbeddingsResponse:
        try:
            model = self._model(request.model)
            items = await asyncio.to_thread(_embedding_items, request, self._config.limits)
            vectors, tokens = await self._encoder.embed.remote(model.id, items)
        except Exception as exc:
            raise _from_ray(exc, request_id) from None
        return embeddings_response(request.model, vectors, request.encoding_format, tokens)

    async def list_models(self) -> list[ModelCard]:
        try:
            states = await self._cache.status.remote()
        except Exception as exc:
            raise _from_ray(exc, "models") from None
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

    async def readiness(self) -> dict[str, Any]:
        checks = {
            "ClipEncoder": self._encoder,
            "SDXLPipeline": self._pipeline,
            "ModelCache": self._cache,
        }
        results = await asyncio.gather(*(_ping(h) for h in checks.values()))
        backends = dict(zip(checks, results, strict=True))
        models: dict[str, dict[str, Any]] = {}
        if backends["ModelCache"] == "ok":
            try:
                models = {card.id: card.state for card in await self.list_models()}
            except ServeError as exc:
                backends["ModelCache"] = f"unavailable: {exc.code}"
        # A model that failed to load, like a provider with an open breaker, does not make the
        # server unready (that would take every other model out of service too): it is listed.
        # Only a server with nothing left to serve is unready.
        failed = sorted(model for model, s in models.items() if s.get("state") == "failed")
        servable = bool(self._providers) or len(failed) < len(self._config.models)
        return {
            "ready": all(r == "ok" for r in backends.values()) and servable,
            "backends": backends,
            "models": models,
            "failed_models": failed,
            "providers": await self._breakers(),
        }

    async def ping(self) -> str:
        return "ok"

    # ---- internals ------------------------------------------------------------------------

    async def _breakers(self) -> dict[str, str]:
        names = list(self._providers)
        states = await asyncio.gather(*(_ping(self._providers[n], "breaker_state") for n in names))
        return dict(zip(names, states, strict=True))

    async def _local_events(
        self, request: GenerateRequest, request_id: str, streaming: bool, started: float
    ) -> AsyncGenerator[Event, None]:
        model = self._model(request.model)
        limits = self._config.limits
        # Images are decoded off the event loop: a large PNG takes tens of milliseconds.
        images = await asyncio.to_thread(decode_images, request, limits)
        request = with_image_size(request, images, limits)
        size = await self._default_size(model, request)
        request = resolve_request(request, model, limits, size)
        job = await self._prepare_job(request, images, model, request_id, started)
        if not streaming:  # nobody would see the previews, or the steps
            job.preview = "none"
            job.stream_steps = False
        events = self._pipeline.options(stream=True, multiplexed_model_id=model.id).stream.remote(
            job
        )
        try:
            try:
                first = await anext(events)
            except BackPressureError:
                fallback = self._config.provider_model(model.fallback or "")
                if fallback is None or request.image_fields or request.noise_mask:
                    raise  # a provider could not take this request's image inputs
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
        remote: tuple[ProviderConfigBase, str],
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

    async def _default_size(
        self, model: ModelConfig, request: GenerateRequest
    ) -> tuple[int, int] | None:
        """The checkpoint's own size, asked of the cache only when the request and the model
        config both leave a side unset (then remembered: a checkpoint's size never changes)."""
        configured = (model.default_width, model.default_height)
        wanted = (request.width, request.height)
        if all(w is not None or c is not None for w, c in zip(wanted, configured, strict=True)):
            return None
        if model.id not in self._checkpoint_sizes:
            defaults = await self._cache.defaults.remote(model.id)
            if not defaults:  # the checkpoint declares no size: the request must give one
                return None
            self._checkpoint_sizes[model.id] = (defaults["width"], defaults["height"])
        return self._checkpoint_sizes[model.id]

    async def _prepare_job(
        self,
        request: GenerateRequest,
        images: DecodedImages,
        model: ModelConfig,
        request_id: str,
        started: float,
    ) -> DenoiseJob:
        assert request.seed is not None and request.width and request.height and request.steps
        fields = await asyncio.to_thread(job_images, request, images)
        prompt = image_prompt_pixels(images)
        if prompt is not None and model.ip_adapter is None:
            raise InvalidRequestError(
                f"model {model.id!r} has no IP-Adapter configured, so it takes no image_prompt; "
                f"models that do: {', '.join(self._image_prompt_models()) or 'none'}",
                code="image_prompt_unsupported",
                param="image_prompt",
            )
        text = self._encoder.encode.remote(model.id, request.prompt, request.negative_prompt)
        if prompt is not None:
            image = self._encoder.encode_image.remote(model.id, prompt)
            embeddings, fields["image_embeds"] = await asyncio.gather(text, image)
            fields["image_prompt_scale"] = request.image_prompt_scale
        else:
            embeddings = await text
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
            **fields,
        )

    def _image_prompt_models(self) -> list[str]:
        return [m.id for m in self._config.models if m.ip_adapter is not None]

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

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from shared.api.capabilities import (
    CapabilitiesResponse,
    Estimate,
    ValidateResponse,
    build_capabilities,
    peak_memory_bytes,
    request_record,
)
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
from shared.api.jobs import DenoiseJob, RefinerHandoff, multiplexed_id
from shared.api.routes import Backend, build_api
from shared.api.schemas import (
    Event,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    RequestRecord,
    ResultEvent,
    ResultMetadata,
)
from shared.config import AppConfig, LimitsConfig, ModelConfig, OpenAIImagesConfig
from shared.errors import (
    BusyError,
    InvalidRequestError,
    NotFoundError,
    ServeError,
    UnavailableError,
)
from shared.intake.decode_pool import decode_pool
from shared.intake.images import decode_image
from shared.intake.json_body import check_tree
from shared.intake.request_images import (
    DecodedImages,
    clip_pixels,
    decode_images,
    image_prompt_pixels,
    job_images,
    with_image_size,
)
from shared.intake.resolve import check_remote_request, parse_request, resolve_request
from shared.memory import bound_heap_growth
from shared.providers.config import ProviderConfigBase
from shared.storage import OutputStore

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
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
            items.append(clip_pixels(decode_image(item, param=param, limits=limits)))
        else:
            items.append(item)
    return items


def _finish(
    event: Event,
    model: str,
    started: float,
    encode_ms: float,
    provenance: ResultMetadata | None = None,
) -> Event:
    """Stamp a result with the model id the client asked for and the end-to-end timings, and a
    local one with what the Router knows of how it was made (`provenance`: the resolved request
    and the weights' digests) next to what the replica added (scheduler, versions)."""
    if isinstance(event, ResultEvent):
        event.model = model
        event.timings.encode_ms = encode_ms
        event.timings.total_ms = (time.time() - started) * 1000
        if provenance is not None:
            replica = event.metadata or ResultMetadata()
            event.metadata = provenance.model_copy(
                update={"scheduler": replica.scheduler, "versions": replica.versions}
            )
    return event


def _refiner_handoff(request: GenerateRequest, embeddings: Any) -> RefinerHandoff:
    """The resolved `refiner` as the job carries it, with the prompt pair encoded the way the
    refiner's checkpoint encodes an empty negative."""
    spec = request.refiner
    assert spec is not None and spec.switch_at is not None
    assert spec.aesthetic_score is not None and spec.negative_aesthetic_score is not None
    return RefinerHandoff(
        switch_at=spec.switch_at,
        aesthetic_score=spec.aesthetic_score,
        negative_aesthetic_score=spec.negative_aesthetic_score,
        embeddings=embeddings,
    )


async def _all_of(calls: dict[str, Any]) -> dict[str, Any]:
    """Every response's answer by name. All are awaited whatever happens, and on a failure or a
    cancel the rest are cancelled: an answer left unawaited is a "Task exception was never
    retrieved" traceback once the client has gone."""
    try:
        answers = await asyncio.gather(*calls.values(), return_exceptions=True)
    except BaseException:
        for response in calls.values():
            response.cancel()
        raise
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return dict(zip(calls, answers, strict=True))


@dataclass
class _Resolved:
    """A local request through the intake, as validate answers it and a job is built from it."""

    request: GenerateRequest  # every default filled in, every limit checked
    images: DecodedImages
    fields: dict[str, Any]  # the DenoiseJob fields of its image inputs, fitted to its size
    record: RequestRecord
    image_prompt: Any  # uint8 RGB for ClipEncoder (`clip_pixels`), or None


def _fit_images(request: GenerateRequest, images: DecodedImages) -> _Resolved:
    """Fit the images to the resolved size; the defaults that come with them (strength,
    start_noise) go into the request too, so its record says what ran."""
    fields = job_images(request, images)
    defaults: dict[str, Any] = {
        name: fields[name] for name in ("strength", "start_noise") if name in fields
    }
    request = request.model_copy(update=defaults)
    record = request_record(request, images)
    return _Resolved(request, images, fields, record, image_prompt_pixels(images))


async def _inline(fn: Callable[..., T], *args: object) -> T:
    return fn(*args)


def _steps_run(request: GenerateRequest) -> int:
    """The UNet steps a request runs: with an init image, those its strength keeps
    (diffusers' `int(steps * strength)`)."""
    assert request.steps is not None
    if request.init_image is None or request.strength is None:
        return request.steps
    return min(int(request.steps * request.strength), request.steps)


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
        bound_heap_growth()  # large bodies must not ratchet the replica's RSS up
        self._config = config
        self._local: dict[str, ModelConfig] = {m.id: m for m in config.models}
        self._encoder = encoder
        self._pipeline = pipeline
        self._cache = cache
        self._providers = providers or {}
        self._checkpoint_sizes: dict[str, tuple[int, int]] = {}
        # What a built engine showed of a model (9-channel UNet, tiny decoder): it never changes.
        self._engine_facts: dict[str, dict[str, bool]] = {}
        self._api_keys = config.auth.load_keys()
        self._store = _output_store(config)

    # ---- handle API (other Ray apps) ------------------------------------------------------

    async def generate(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """Generate and return the whole response; raises a ServeError subclass on failure."""
        return await self.generate_response(self._handle_request(request), new_request_id())

    async def stream(self, request: GenerateRequest | dict[str, Any]) -> AsyncIterator[Event]:
        """Yield StepEvents then a ResultEvent; a failure is the last event, an ErrorEvent."""
        request_id = new_request_id()
        try:
            async for event in self.stream_events(self._handle_request(request), request_id):
                yield event
        except ServeError as exc:
            yield error_event(exc, request_id)

    async def models(self) -> list[ModelCard]:
        return await self.list_models()

    async def embeddings(self, request: EmbeddingsRequest | dict[str, Any]) -> EmbeddingsResponse:
        """CLIP embeddings of texts and images, as POST /v1/embeddings answers them."""
        limits = self._config.limits
        if not isinstance(request, EmbeddingsRequest):
            check_tree(request, limits)
            request = parse_embeddings_request(request, limits)
        else:
            check_tree(request.model_dump(), limits)
        return await self.create_embeddings(request, new_request_id())

    def _handle_request(self, request: GenerateRequest | dict[str, Any]) -> GenerateRequest:
        """A handle caller's request under the limits and text rule an HTTP body is held to."""
        body = request.model_dump() if isinstance(request, GenerateRequest) else request
        check_tree(body, self.limits)
        return parse_request(request)

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
            remote = self._remote(request)
            if remote is not None:
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

    async def validate_request(self, request: GenerateRequest, request_id: str) -> ValidateResponse:
        try:
            if self._remote(request) is not None:  # the provider resolves the rest itself
                return ValidateResponse(
                    request=request.model_dump(mode="json"), estimate=Estimate()
                )
            model = self._model(request.model)
            resolved = await self._resolve(request, model)
            estimate = await self._estimate(resolved.request, model)
        except Exception as exc:
            raise _from_ray(exc, request_id) from None
        record = resolved.record
        return ValidateResponse(request=record.request, images=record.images, estimate=estimate)

    async def capabilities(self) -> CapabilitiesResponse:
        models = self._config.models
        try:
            states = await self._cache.status.remote()
            answers = await asyncio.gather(*(self._model_runtime(m.id) for m in models))
            sizes = {m.id: await self._known_size(m, states.get(m.id, {})) for m in models}
        except Exception as exc:
            raise _from_ray(exc, "capabilities") from None
        runtimes = {m.id: answer["runtime"] for m, answer in zip(models, answers, strict=True)}
        return build_capabilities(self._config, runtimes, self._engine_facts, sizes)

    async def create_embeddings(
        self, request: EmbeddingsRequest, request_id: str
    ) -> EmbeddingsResponse:
        try:
            model = self._model(request.model)
            limits = self._config.limits
            items = await decode_pool(limits).run(_embedding_items, request, limits)
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

    def _remote(self, request: GenerateRequest) -> tuple[ProviderConfigBase, str] | None:
        """The provider model a request names, its edge checks passed; None for a local one."""
        remote = self._config.provider_model(request.model)
        if remote is not None:
            check_remote_request(request, self._config.limits)
        return remote

    async def _resolve(self, request: GenerateRequest, model: ModelConfig) -> _Resolved:
        """Everything before encoding: images decoded and checked, every default filled in,
        limits and the model's abilities checked. Generation and validation share it."""
        limits = self._config.limits
        # Images are decoded in the bounded, low-priority intake pool, never on the event loop;
        # a request without any has nothing to wait for there.
        run = decode_pool(limits).run if request.image_fields else _inline
        images = await run(decode_images, request, limits)
        request = with_image_size(request, images, limits)
        size = await self._default_size(model, request)
        request = resolve_request(request, model, limits, size)
        if images.image_prompt is not None and model.ip_adapter is None:
            raise InvalidRequestError(
                f"model {model.id!r} has no IP-Adapter configured, so it takes no image_prompt; "
                f"models that do: {', '.join(self._image_prompt_models()) or 'none'}",
                code="image_prompt_unsupported",
                param="image_prompt",
            )
        return await run(_fit_images, request, images)

    async def _estimate(self, request: GenerateRequest, model: ModelConfig) -> Estimate:
        """Queue and run time from the step times measured on the replica that would take the
        request; peak memory from the weights the cache holds (see `Estimate`)."""
        assert request.width and request.height
        handle = self._pipeline.options(multiplexed_model_id=model.id)
        answers = await _all_of(
            {
                "timing": handle.estimate.remote(
                    model.id, request.width, request.height, _steps_run(request), request.n
                ),
                "states": self._cache.status.remote(),
            }
        )
        timing, states = answers["timing"], answers["states"]
        weights = states.get(model.id, {}).get("bytes", 0)
        size = (request.width, request.height)
        peak = peak_memory_bytes(weights, request.n, request.guidance_scale, *size, model.dtype)
        return Estimate(**timing, peak_memory_bytes=peak if weights else None)

    async def _model_runtime(self, model_id: str) -> dict[str, Any]:
        """A replica's `model_runtime` answer, from one that holds the model if any does."""
        handle = self._pipeline.options(multiplexed_model_id=model_id)
        call = handle.model_runtime.remote(model_id, model_id not in self._engine_facts)
        try:
            answer = await asyncio.wait_for(call, READY_TIMEOUT_S)
        except TimeoutError:
            raise UnavailableError(
                f"no SDXLPipeline replica answered within {READY_TIMEOUT_S:g} s; retry later"
            ) from None
        if answer["engine"] is not None:
            self._engine_facts[model_id] = answer["engine"]
        return answer

    async def _local_events(
        self, request: GenerateRequest, request_id: str, streaming: bool, started: float
    ) -> AsyncGenerator[Event, None]:
        model = self._model(request.model)
        resolved = await self._resolve(request, model)
        request = resolved.request
        job = await self._prepare_job(resolved, model, request_id, started)
        record = resolved.record
        provenance = ResultMetadata(request=record.request, images=record.images)
        if not streaming:  # nobody would see the previews, or the steps
            job.preview = "none"
            job.stream_steps = False
        # Multiplexed by model and LoRA set: a set's requests prefer the replica holding it.
        entry = multiplexed_id(model.id, job.loras)
        events = self._pipeline.options(stream=True, multiplexed_model_id=entry).stream.remote(job)
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
            encode_ms = job.timings["encode_ms"]
            yield _finish(first, request.model, started, encode_ms, provenance)
            async for event in events:
                if isinstance(event, ResultEvent):
                    # Asked only now, while the replica holds the model: asking before could
                    # load weights nobody holds, which the cache may evict again at once.
                    provenance.components = await self._cache.digests.remote(model.id)
                yield _finish(event, request.model, started, encode_ms, provenance)
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
        return await self._checkpoint_size(model.id)

    async def _known_size(
        self, model: ModelConfig, state: dict[str, Any]
    ) -> tuple[int, int] | None:
        """The checkpoint's own size for capabilities: asked of the cache only when the config
        leaves a side unset and the weights are cached (the question never loads a model)."""
        if model.default_width is not None and model.default_height is not None:
            return None
        if model.id in self._checkpoint_sizes or state.get("state") == "cached":
            return await self._checkpoint_size(model.id)
        return None

    async def _checkpoint_size(self, model_id: str) -> tuple[int, int] | None:
        """The size the checkpoint declares, asked of the cache once (it never changes)."""
        if model_id not in self._checkpoint_sizes:
            defaults = await self._cache.defaults.remote(model_id)
            if not defaults:  # the checkpoint declares no size: the request must give one
                return None
            self._checkpoint_sizes[model_id] = (defaults["width"], defaults["height"])
        return self._checkpoint_sizes[model_id]

    async def _prepare_job(
        self, resolved: _Resolved, model: ModelConfig, request_id: str, started: float
    ) -> DenoiseJob:
        request = resolved.request
        assert request.seed is not None and request.width and request.height and request.steps
        fields = dict(resolved.fields)
        prompt = resolved.image_prompt
        pair = (model.id, request.prompt, request.negative_prompt)
        calls = {"text": self._encoder.encode.remote(*pair)}
        if request.refiner is not None:
            # The refiner's checkpoint may encode an empty negative differently.
            calls["refiner"] = self._encoder.encode.remote(*pair, True)
        if prompt is not None:
            calls["image"] = self._encoder.encode_image.remote(model.id, prompt)
        answers = await _all_of(calls)
        embeddings = answers["text"]
        if request.refiner is not None:
            fields["refiner"] = _refiner_handoff(request, answers["refiner"])
        if prompt is not None:
            fields["image_embeds"] = answers["image"]
            fields["image_prompt_scale"] = request.image_prompt_scale
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
            loras=tuple((lora.id, lora.scale) for lora in request.loras),
            **fields,
        )

    def _image_prompt_models(self) -> list[str]:
        return [m.id for m in self._config.models if m.ip_adapter is not None]

    def _model(self, model_id: str) -> ModelConfig:
        model = self._local.get(model_id)
        if model is None:
            remote = [f"{p.name}/{m}" for p in self._config.providers for m in p.models]
            known = ", ".join(sorted(self._local) + remote)
            raise NotFoundError(
                f"unknown model {model_id!r}; available models: {known}",
                code="model_not_found",
                param="model",
            )
        return model

"""OpenAI Images API client: `POST {base}/v1/images/generations`.

Request: `model, prompt, n, size ("WxH"), quality, user`, plus `output_format, background,
moderation` for GPT image models or `response_format` for legacy (DALL·E) models — which family a
model is comes from the configured name prefixes. Answer: `{created, data: [{b64_json | url,
revised_prompt}], usage}`; URLs are downloaded with the same client.

Streaming (`stream: true` + `partial_images`, GPT image models only): the SSE events
`image_generation.partial_image` become our `step` events carrying the partial as a preview, and
each `image_generation.completed` event is one final image of the `result` event. An error in the
stream may come as `{"error": {...}}` or flat, `{"type": "error", "code", "message"}`; both keep
their code.

Errors: a 401 is our key refused; a 403 from OpenAI (an organization not verified for a model, a
region) is `provider_unsupported` carrying OpenAI's own message.

Fields of `GenerateRequest` this API has no knob for (negative_prompt, steps, guidance_scale,
scheduler, seed) are not sent; the result's images carry `seed=None` to say no seed applied.

`OpenAICompatibleClient` maps the protocol under whichever `OpenAIOptions` block it is given, so
Parasail (`parasail.py`) reuses it with its own block and a capability probe in front.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field

from shared.api.schemas import GeneratedImage, GenerateRequest, ResultEvent, StepEvent
from shared.providers.base import BaseProviderClient, ErrorInfo, decode_json, requested_size
from shared.providers.config import ProviderConfigBase, StrictModel
from shared.providers.errors import (
    ContentFilteredError,
    ProviderBadResponseError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailableError,
    ProviderUnsupportedError,
)
from shared.providers.images import b64_payload, generated_image, preview_image
from shared.providers.reliability import Deadline
from shared.providers.sse import ServerSentEvent, iter_sse

GENERATIONS_PATH = "/v1/images/generations"
MODELS_PATH = "/v1/models"
PARTIAL_EVENT = "image_generation.partial_image"
COMPLETED_EVENT = "image_generation.completed"
# OpenAI's codes for a prompt or image its safety system refused (GPT image / DALL·E models).
CONTENT_FILTER_CODES = {"moderation_blocked", "content_policy_violation"}
QUOTA_CODES = {"insufficient_quota", "billing_hard_limit_reached"}
AUTH_CODES = {"invalid_api_key"}


class OpenAIOptions(StrictModel):
    """OpenAI Images API options (`POST /v1/images/generations`)."""

    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        default=None, description="`quality` sent with every request; provider default if unset."
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        default=None, description="`background` for GPT image models; provider default if unset."
    )
    moderation: Literal["low", "auto"] | None = Field(
        default=None,
        description="`moderation` level for GPT image models; provider default if unset.",
    )
    user: str | None = Field(
        default=None, max_length=256, description="Stable end-user/deployment id sent as `user`."
    )
    partial_images: int = Field(
        default=2, ge=0, le=3, description="Partial images requested when streaming with previews."
    )
    streaming_model_prefixes: list[str] = Field(
        default_factory=lambda: ["gpt-image", "chatgpt-image"],
        description="Models (by name prefix) that accept `stream: true` + `partial_images`.",
    )
    legacy_model_prefixes: list[str] = Field(
        default_factory=lambda: ["dall-e"],
        description="Models (by name prefix) that take `response_format` instead of "
        "`output_format`/`background`/`moderation`.",
    )
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="`response_format` for legacy models; URLs are downloaded."
    )


class OpenAIProviderConfig(ProviderConfigBase):
    """A provider speaking the OpenAI Images API."""

    DEFAULT_BASE_URL: ClassVar[str] = "https://api.openai.com"
    DEFAULT_API_KEY_ENV: ClassVar[str] = "OPENAI_API_KEY"

    kind: Literal["openai"] = Field(description="Protocol: the OpenAI Images API.")
    openai: OpenAIOptions = Field(
        default_factory=OpenAIOptions, description="OpenAI Images options; defaults if unset."
    )


class OpenAICompatibleClient(BaseProviderClient):
    """The OpenAI Images protocol, shaped by the `OpenAIOptions` block its subclass passes."""

    def __init__(
        self,
        config: ProviderConfigBase,
        options: OpenAIOptions,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(config, transport)
        self._options = options

    # -- request ----------------------------------------------------------------------------------

    def _payload(self, request: GenerateRequest, *, partial_images: int | None) -> dict[str, Any]:
        options = self._options
        payload: dict[str, Any] = {"model": request.model, "prompt": request.prompt, "n": request.n}
        size = requested_size(request, self.name)
        if size is not None:
            payload["size"] = f"{size[0]}x{size[1]}"
        if self._is_legacy(request.model):
            payload["response_format"] = options.response_format
        else:
            payload["output_format"] = request.output_format
            payload["background"] = options.background
            payload["moderation"] = options.moderation
        payload["quality"] = options.quality
        payload["user"] = options.user
        if partial_images is not None:
            payload.update(stream=True, partial_images=partial_images)
        return {key: value for key, value in payload.items() if value is not None}

    def _is_legacy(self, model: str) -> bool:
        return model.startswith(tuple(self._options.legacy_model_prefixes))

    def _streams(self, model: str) -> bool:
        return model.startswith(tuple(self._options.streaming_model_prefixes))

    # -- non-streaming ------------------------------------------------------------------------

    async def _generate_images(
        self, request: GenerateRequest, request_id: str, budget: Deadline
    ) -> list[GeneratedImage]:
        payload = self._payload(request, partial_images=None)
        answer = await self._call_json("POST", GENERATIONS_PATH, budget, payload)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not data:
            raise ProviderBadResponseError(f"provider {self.name} answer has no `data` list")
        return [await self._image(item, budget) for item in data]

    async def _image(self, item: Any, budget: Deadline) -> GeneratedImage:
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str):
            return generated_image(b64_payload(item["b64_json"]))
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            return generated_image(await self._download(item["url"], budget))
        raise ProviderBadResponseError(
            f"provider {self.name} image entry has neither `b64_json` nor `url`"
        )

    # -- streaming ------------------------------------------------------------------------------

    async def stream(
        self, request: GenerateRequest, request_id: str, deadline: float | None = None
    ) -> AsyncIterator[StepEvent | ResultEvent]:
        if not self._streams(request.model):
            yield await self.generate(request, request_id, deadline)
            return
        started = time.perf_counter()
        budget = self._begin(request, deadline)
        await self._preflight(request, budget)
        partials = self._options.partial_images if request.preview != "none" else 0
        payload = self._payload(request, partial_images=partials)
        relay = _PartialRelay(request_id, total=max(1, partials * request.n), started=started)
        images: list[GeneratedImage] = []
        async with self._open_stream(GENERATIONS_PATH, payload, budget) as response:
            async for sse in iter_sse(self._stream_lines(response, budget)):
                if sse.data == "[DONE]":  # OpenAI-compatible servers may end streams this way
                    break
                event = self._stream_event(sse)
                if event.get("type") == PARTIAL_EVENT:
                    yield relay.step(_b64_field(event, self.name))
                elif event.get("type") == COMPLETED_EVENT:
                    images.append(generated_image(_b64_field(event, self.name)))
            result = self._result(request, request_id, images, started)
        yield result

    def _stream_event(self, sse: ServerSentEvent) -> dict[str, Any]:
        event = decode_json(sse.data.encode(), f"provider {self.name} stream event")
        if not isinstance(event, dict):
            raise ProviderBadResponseError(f"provider {self.name} stream event is not an object")
        if "error" in event or sse.event == "error" or event.get("type") == "error":
            # An error after a 200 cannot be retried: the stream has already been relayed.
            info = self._parse_error(event) or _flat_error(event) or ErrorInfo(message=sse.data)
            cls = self._classify_error(200, info) or ProviderUnavailableError
            raise cls(self._failure_message(200, info, cls), param=info.param, retryable=False)
        event.setdefault("type", sse.event)
        return event

    # -- probe and errors -----------------------------------------------------------------------

    async def _probe_models(self, budget: Deadline) -> dict[str, str]:
        listed = await self._listed_models(budget)
        return {m: "available" if m in listed else "unsupported" for m in self.config.models}

    async def _listed_models(self, budget: Deadline) -> set[str]:
        answer = await self._call_json_once("GET", MODELS_PATH, budget)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise ProviderBadResponseError(f"provider {self.name} model list has no `data` list")
        return {item["id"] for item in data if isinstance(item, dict) and "id" in item}

    def _parse_error(self, body: Any) -> ErrorInfo | None:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return None
        return ErrorInfo(
            message=str(error.get("message") or "no message"),
            code=error.get("code") or error.get("type"),
            param=error.get("param"),
        )

    def _classify_error(self, status: int, info: ErrorInfo) -> type[ProviderError] | None:
        if info.code in QUOTA_CODES:
            return ProviderQuotaError
        if info.code in CONTENT_FILTER_CODES:
            return ContentFilteredError
        return None


class OpenAIImagesClient(OpenAICompatibleClient):
    config_class = OpenAIProviderConfig

    def __init__(
        self, config: OpenAIProviderConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        super().__init__(config, config.openai, transport)

    def _classify_error(self, status: int, info: ErrorInfo) -> type[ProviderError] | None:
        # OpenAI refuses a bad key with 401. Its 403s are about what the account may do (an
        # organization that must be verified for gpt-image-1, an unsupported region): the key
        # worked, and OpenAI's message says what to do, so it must not read "key refused".
        if status == 403 and info.code not in AUTH_CODES:
            return ProviderUnsupportedError
        return super()._classify_error(status, info)


class _PartialRelay:
    """Turns partial images into numbered step events with their timing."""

    def __init__(self, request_id: str, total: int, started: float) -> None:
        self._request_id = request_id
        self._total = total
        self._started = started
        self._last = started
        self._index = 0

    def step(self, data: bytes) -> StepEvent:
        now = time.perf_counter()
        self._index += 1
        event = StepEvent(
            id=self._request_id,
            index=self._index,
            total=max(self._total, self._index),
            elapsed_ms=(now - self._started) * 1000,
            step_ms=(now - self._last) * 1000,
            previews=[preview_image(data)],
        )
        self._last = now
        return event


def _flat_error(event: dict[str, Any]) -> ErrorInfo | None:
    """A stream error in the flat shape `{"type": "error", "code", "message", "param"}`."""
    if event.get("type") != "error":
        return None
    return ErrorInfo(
        message=str(event.get("message") or "no message"),
        code=event.get("code"),
        param=event.get("param"),
    )


def _b64_field(event: dict[str, Any], provider: str) -> bytes:
    value = event.get("b64_json")
    if not isinstance(value, str):
        raise ProviderBadResponseError(f"provider {provider} {event.get('type')} has no b64_json")
    return b64_payload(value)

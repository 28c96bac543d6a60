"""Fake OpenAI Images API (and Parasail, its OpenAI-compatible cousin) on loopback.

`POST /v1/images/generations` validates like the real API: Bearer key (401 without or with a wrong
one), unknown parameters (400 `unknown_parameter`), parameters of the other model family (GPT
image models take `output_format/background/moderation/stream/partial_images`, DALL·E models take
`response_format/style`), `n`, `size`, enums. Errors use OpenAI's envelope `{"error": {message,
type, param, code}}`. With `stream: true` it answers SSE `image_generation.partial_image` events
and one `image_generation.completed` per image. `GET /v1/models` lists the models.

Faults: the generic ones, `content_filter` (400 `moderation_blocked`), `quota` (429
`insufficient_quota`), `org_unverified` (OpenAI's 403 for gpt-image-1 without a verified
organization, `code: null`), and, for streams, `stream_error` / `stream_error_wrapped`: after the
first partial image the stream ends with an `error` event whose code is the fault's `text`, flat
(`{"type": "error", "code", "message", "param"}`) or in the `{"error": {...}}` envelope.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.images import MIME_TYPES, make_b64, make_image
from tests.fakes.server import FakeProvider, Fault

GPT_FIELDS = {"output_format", "output_compression", "background", "moderation"}
GPT_FIELDS |= {"stream", "partial_images"}
LEGACY_FIELDS = {"response_format", "style"}
COMMON_FIELDS = {"model", "prompt", "n", "size", "quality", "user"}
ENUMS = {
    "quality": {"low", "medium", "high", "auto", "standard", "hd"},
    "background": {"transparent", "opaque", "auto"},
    "moderation": {"low", "auto"},
    "output_format": {"png", "jpeg", "webp"},
    "response_format": {"url", "b64_json"},
    "style": {"vivid", "natural"},
}
LEGACY_SIZES = {
    "dall-e-2": {"256x256", "512x512", "1024x1024"},
    "dall-e-3": {"1024x1024", "1792x1024", "1024x1792"},
}


class _Invalid(Exception):
    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class OpenAIFake(FakeProvider):
    kind = "openai"
    default_models = ["gpt-image-1", "gpt-image-1-mini", "dall-e-2", "dall-e-3"]
    special_faults = {
        "content_filter",
        "quota",
        "org_unverified",
        "stream_error",
        "stream_error_wrapped",
    }
    owned_by = "openai"

    def __init__(self, *, stream_interval_s: float = 0.0, **kwargs: Any) -> None:
        self.stream_interval_s = stream_interval_s
        super().__init__(**kwargs)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/images/generations", self._generations, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ]

    def error_response(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        type_: str | None = None,
    ) -> Response:
        default_type = "invalid_request_error" if status < 500 else "server_error"
        body = {"message": message, "type": type_ or default_type, "param": param, "code": code}
        return JSONResponse({"error": body}, status_code=status, headers=headers)

    def rate_limit_response(self, fault: Fault) -> Response:
        headers = {"retry-after": fault.retry_after} if fault.retry_after else None
        return self.error_response(
            429,
            "Rate limit reached for images per minute. Please try again later.",
            code="rate_limit_exceeded",
            type_="requests",
            headers=headers,
        )

    # -- routes ---------------------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        await self.record(request)
        denied = self._auth_failure(request)
        if denied is not None:
            return denied
        data = [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": self.owned_by}
            for m in self.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def _generations(self, request: Request) -> Response:
        call = await self.record(request)
        fault, early = await self.take_fault(request)
        if early is not None:
            return early
        denied = self._auth_failure(request)
        if denied is not None:
            return denied
        try:
            params = self._validate(call.body)
        except _Invalid as exc:
            status = 404 if exc.code == "model_not_found" else 400
            return self.error_response(status, str(exc), code=exc.code, param=exc.param)
        refusal = self._fault_answer(fault)
        if refusal is not None:
            return refusal
        if params.get("stream"):
            return StreamingResponse(self._events(params, fault), media_type="text/event-stream")
        return JSONResponse(self._answer(params))

    # -- validation -----------------------------------------------------------------------------

    def _auth_failure(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        if not header:
            return self.error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        key = header.removeprefix("Bearer ").strip()
        if key != self.api_key:
            masked = f"{key[:3]}***{key[-4:]}" if len(key) > 8 else "***"
            return self.error_response(
                401, f"Incorrect API key provided: {masked}.", code="invalid_api_key"
            )
        return None

    def _validate(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _Invalid(
                "We could not parse the JSON body of your request.", None, "invalid_json"
            )
        for name in body:
            if name not in COMMON_FIELDS | GPT_FIELDS | LEGACY_FIELDS:
                raise _Invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise _Invalid("Missing required parameter: 'prompt'.", "prompt", "missing_required")
        model = body.get("model", "dall-e-2")
        if model not in self.image_models():
            raise _Invalid(
                f"The model `{model}` does not exist or you do not have access to it.",
                None,
                "model_not_found",
            )
        legacy = model.startswith("dall-e")
        foreign = (GPT_FIELDS if legacy else LEGACY_FIELDS) & set(body)
        for name in sorted(foreign):
            raise _Invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
        for name, allowed in ENUMS.items():
            if name in body and body[name] not in allowed:
                raise _Invalid(f"Invalid value for '{name}': {body[name]!r}.", name)
        return self._normalised(body, model, legacy)

    def _normalised(self, body: dict[str, Any], model: str, legacy: bool) -> dict[str, Any]:
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            raise _Invalid(f"Invalid 'n': integer between 1 and 10 expected, got {n!r}.", "n")
        if model == "dall-e-3" and n != 1:
            raise _Invalid("dall-e-3 only supports n=1.", "n")
        width, height = _size(body.get("size", "auto"), LEGACY_SIZES.get(model))
        partials = body.get("partial_images", 0)
        if not isinstance(partials, int) or not 0 <= partials <= 3:
            raise _Invalid("Invalid 'partial_images': integer between 0 and 3.", "partial_images")
        fmt = "png" if legacy else body.get("output_format", "png")
        return dict(
            body,
            model=model,
            n=n,
            width=width,
            height=height,
            format=fmt,
            legacy=legacy,
            partial_images=partials,
        )

    def image_models(self) -> list[str]:
        return self.models

    # -- answers --------------------------------------------------------------------------------

    def _fault_answer(self, fault: Fault | None) -> Response | None:
        if fault is not None and fault.kind == "content_filter":
            return self.error_response(
                400,
                "Your request was rejected as a result of our safety system.",
                code="moderation_blocked",
                type_="image_generation_user_error",
            )
        if fault is not None and fault.kind == "org_unverified":
            return self.error_response(
                403,
                "Your organization must be verified to use the model `gpt-image-1`. Please go "
                "to: https://platform.openai.com/settings/organization/general and click on "
                "Verify Organization. If you just verified, it can take up to 15 minutes for "
                "access to propagate.",
            )
        if fault is not None and fault.kind == "quota":
            return self.error_response(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                code="insufficient_quota",
                type_="insufficient_quota",
            )
        return None

    def _answer(self, params: dict[str, Any]) -> dict[str, Any]:
        seeds = range(len(self.calls), len(self.calls) + params["n"])
        if params["legacy"]:
            data = [self._legacy_item(params, seed) for seed in seeds]
            return {"created": int(time.time()), "data": data}
        size = (params["width"], params["height"], params["format"])
        return {
            "created": int(time.time()),
            "background": "opaque",
            "data": [{"b64_json": make_b64(*size, seed)} for seed in seeds],
            "output_format": params["format"],
            "quality": params.get("quality", "medium"),
            "size": f"{params['width']}x{params['height']}",
            "usage": _usage(),
        }

    def _legacy_item(self, params: dict[str, Any], seed: int) -> dict[str, Any]:
        item: dict[str, Any] = {"revised_prompt": params["prompt"]}
        if params.get("response_format", "url") == "b64_json":
            item["b64_json"] = make_b64(params["width"], params["height"], "png", seed)
        else:
            data = make_image(params["width"], params["height"], "png", seed)
            item["url"] = self.store_file(data, MIME_TYPES["png"], "png")
        return item

    async def _events(self, params: dict[str, Any], fault: Fault | None) -> AsyncIterator[bytes]:
        base = {
            "created_at": int(time.time()),
            "size": f"{params['width']}x{params['height']}",
            "quality": params.get("quality", "medium"),
            "background": params.get("background", "opaque"),
            "output_format": params["format"],
        }
        size = (params["width"], params["height"], params["format"])
        for image in range(params["n"]):
            for index in range(params["partial_images"]):
                yield _sse(
                    "image_generation.partial_image",
                    base | {"b64_json": make_b64(*size, 100 + index), "partial_image_index": index},
                )
                if fault is not None and fault.kind.startswith("stream_error"):
                    yield _stream_error(fault)
                    return
                if self.stream_interval_s:
                    await asyncio.sleep(self.stream_interval_s)
            yield _sse(
                "image_generation.completed",
                base | {"b64_json": make_b64(*size, image), "usage": _usage()},
            )


class ParasailFake(OpenAIFake):
    """Parasail: OpenAI-compatible; `/v1/models` lists what this account may use.

    `image_models` are the listed models that generate images; with `images_enabled=False` the
    account has no image route at all (a framework 404, not an OpenAI error body).
    """

    kind = "parasail"
    default_models = ["parasail-llama-33-70b-fp8", "parasail-flux-schnell"]
    owned_by = "parasail"

    def __init__(
        self,
        *,
        image_models: list[str] | None = None,
        images_enabled: bool = True,
        **kwargs: Any,
    ) -> None:
        self._image_models = list(image_models or ["parasail-flux-schnell"])
        self.images_enabled = images_enabled
        super().__init__(**kwargs)

    def image_models(self) -> list[str]:
        return [m for m in self._image_models if m in self.models]

    def served_models(self) -> list[str]:
        return list(self._image_models)

    async def _generations(self, request: Request) -> Response:
        if not self.images_enabled:
            await self.record(request)
            return PlainTextResponse("Not Found", status_code=404)
        return await super()._generations(request)


def _size(value: Any, fixed: set[str] | None) -> tuple[int, int]:
    if value == "auto":
        return 1024, 1024
    if not isinstance(value, str) or (fixed is not None and value not in fixed):
        allowed = ", ".join(sorted(fixed)) if fixed else "auto or WIDTHxHEIGHT"
        raise _Invalid(f"Invalid value for 'size': {value!r}. Supported: {allowed}.", "size")
    width, _, height = value.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise _Invalid(f"Invalid value for 'size': {value!r}.", "size")
    w, h = int(width), int(height)
    if fixed is None and (w % 16 or h % 16 or not 16 <= w <= 3840 or not 16 <= h <= 3840):
        raise _Invalid(f"Invalid 'size' {value}: sides must be multiples of 16 up to 3840.", "size")
    return w, h


def _usage() -> dict[str, Any]:
    return {
        "input_tokens": 12,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 12},
        "output_tokens": 272,
        "total_tokens": 284,
    }


def _stream_error(fault: Fault) -> bytes:
    error = {
        "code": fault.text or "server_error",
        "message": "Image generation failed.",
        "param": None,
    }
    if fault.kind == "stream_error_wrapped":
        body = {"error": error | {"type": "server_error"}}
        return f"event: error\ndata: {json.dumps(body)}\n\n".encode()
    return _sse("error", error)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data | {"type": event})
    return f"event: {event}\ndata: {payload}\n\n".encode()

"""Fake Gemini API on loopback: `POST /v1beta/models/{model}:generateContent`, `GET` model info.

Validates like the real API: no key (403 PERMISSION_DENIED), a wrong key (400 INVALID_ARGUMENT
with an `ErrorInfo` reason API_KEY_INVALID), unknown fields at any level (400 "Unknown name"),
empty `contents`, unknown modalities and aspect ratios, models it does not have (404 NOT_FOUND).
Errors use Google's `{"error": {code, message, status, details}}`; a 429 carries its wait as a
`RetryInfo.retryDelay` in the body, not as a header. Answers `{candidates: [{content: {role,
parts: [{inlineData: {mimeType, data}}]}, finishReason, index}], usageMetadata, modelVersion}`
with an image whose size follows the aspect ratio (64 px per ratio unit).

Faults: the generic ones plus `content_filter` (finishReason IMAGE_SAFETY, no parts),
`prompt_blocked` (promptFeedback.blockReason, no candidates), `text_only` (the model answers in
prose), `finish_reason` (no parts, the reason given in `text`), `data_uri` and `snake_case`
(image encodings a defensive parser must accept).
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.images import make_b64
from tests.fakes.server import FakeProvider, Fault

TOP_FIELDS = {"contents", "generationConfig", "safetySettings", "systemInstruction", "tools"}
CONFIG_FIELDS = {"responseModalities", "imageConfig", "seed", "temperature", "candidateCount"}
IMAGE_CONFIG_FIELDS = {"aspectRatio", "imageSize"}
PART_FIELDS = {"text", "inlineData"}
ASPECT_RATIOS = {"1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"}
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class _Invalid(Exception):
    pass


class GeminiFake(FakeProvider):
    kind = "gemini"
    default_models = ["gemini-2.5-flash-image", "gemini-2.5-flash"]
    special_faults = {
        "content_filter",
        "prompt_blocked",
        "text_only",
        "finish_reason",
        "data_uri",
        "snake_case",
    }

    def __init__(self, *, image_models: list[str] | None = None, **kwargs: Any) -> None:
        self.image_models = list(image_models or ["gemini-2.5-flash-image"])
        super().__init__(**kwargs)

    def routes(self) -> list[Route]:
        return [
            Route("/v1beta/models/{target}", self._model_info, methods=["GET"]),
            Route("/v1beta/models/{target}", self._generate, methods=["POST"]),
        ]

    def served_models(self) -> list[str]:
        return list(self.image_models)

    def error_response(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> Response:
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": code or STATUS_NAMES.get(status, "UNKNOWN"),
        }
        if details:
            error["details"] = details
        return JSONResponse({"error": error}, status_code=status, headers=headers)

    def rate_limit_response(self, fault: Fault) -> Response:
        retry_info = {
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": f"{fault.retry_after or '1'}s",
        }
        return self.error_response(
            429, "Resource has been exhausted (e.g. check quota).", details=[retry_info]
        )

    # -- routes ---------------------------------------------------------------------------------

    async def _model_info(self, request: Request) -> Response:
        await self.record(request)
        denied = self._auth_failure(request)
        if denied is not None:
            return denied
        model = request.path_params["target"]
        if model not in self.models:
            return self._not_found(model)
        methods = ["generateContent", "countTokens"]
        return JSONResponse(
            {"name": f"models/{model}", "displayName": model, "supportedGenerationMethods": methods}
        )

    async def _generate(self, request: Request) -> Response:
        call = await self.record(request)
        fault, early = await self.take_fault(request)
        if early is not None:
            return early
        denied = self._auth_failure(request)
        if denied is not None:
            return denied
        model, _, method = request.path_params["target"].partition(":")
        if method != "generateContent" or model not in self.models:
            return self._not_found(model)
        try:
            config = _validate(call.body)
        except _Invalid as exc:
            return self.error_response(400, str(exc))
        return JSONResponse(self._answer(model, config, fault))

    def _auth_failure(self, request: Request) -> Response | None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            return self.error_response(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if key != self.api_key:
            reason = {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
            return self.error_response(
                400, "API key not valid. Please pass a valid API key.", details=[reason]
            )
        return None

    def _not_found(self, model: str) -> Response:
        return self.error_response(
            404,
            f"models/{model} is not found for API version v1beta, or is not supported for "
            "generateContent.",
        )

    # -- answers --------------------------------------------------------------------------------

    def _answer(self, model: str, config: dict[str, Any], fault: Fault | None) -> dict[str, Any]:
        kind = fault.kind if fault is not None else None
        answer: dict[str, Any] = {
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
            "modelVersion": model,
            "responseId": uuid.uuid4().hex[:22],
        }
        if kind == "prompt_blocked":
            return answer | {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}
        if kind in ("content_filter", "finish_reason"):
            reason = "IMAGE_SAFETY" if kind == "content_filter" else (fault and fault.text)
            return answer | {"candidates": [{"finishReason": reason, "index": 0}]}
        parts = self._parts(model, config, fault)
        candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP"}
        return answer | {"candidates": [candidate | {"index": 0}]}

    def _parts(self, model: str, config: dict[str, Any], fault: Fault | None) -> list[Any]:
        kind = fault.kind if fault is not None else None
        # Image models answer with text and an image unless told otherwise.
        modalities = config.get("responseModalities", ["TEXT", "IMAGE"])
        if kind == "text_only" or "IMAGE" not in modalities or model not in self.image_models:
            text = (fault.text if fault is not None else None) or "I can only answer in words."
            return [{"text": text}]
        ratio = config.get("imageConfig", {}).get("aspectRatio", "1:1")
        width, _, height = ratio.partition(":")
        data = make_b64(int(width) * 64, int(height) * 64, "png", config.get("seed", 1))
        parts: list[Any] = []
        if "TEXT" in modalities:
            parts.append({"text": "Here is your image."})
        if kind == "data_uri":
            parts.append(
                {"inlineData": {"mimeType": "image/png", "data": f"data:image/png;base64,{data}"}}
            )
        elif kind == "snake_case":
            parts.append({"inline_data": {"mime_type": "image/png", "data": data}})
        else:
            parts.append({"inlineData": {"mimeType": "image/png", "data": data}})
        return parts


def _validate(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Invalid("Invalid JSON payload received. Expected an object.")
    _known(body, TOP_FIELDS, "")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _Invalid("* GenerateContentRequest.contents: contents is not specified")
    for content in contents:
        _known(content, {"role", "parts"}, "contents[0]")
        for part in content.get("parts") or []:
            _known(part, PART_FIELDS, "contents[0].parts[0]")
    config = body.get("generationConfig", {})
    _known(config, CONFIG_FIELDS, "generation_config")
    for modality in config.get("responseModalities", []):
        if modality not in ("TEXT", "IMAGE"):
            raise _Invalid(f"Invalid value at 'generation_config.response_modalities' ({modality})")
    image_config = config.get("imageConfig", {})
    _known(image_config, IMAGE_CONFIG_FIELDS, "generation_config.image_config")
    if "aspectRatio" in image_config and image_config["aspectRatio"] not in ASPECT_RATIOS:
        raise _Invalid(f"Unsupported aspect ratio: {image_config['aspectRatio']}")
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or not -(2**31) <= seed < 2**31:
        raise _Invalid("Invalid value at 'generation_config.seed' (TYPE_INT32)")
    return config


def _known(value: Any, fields: set[str], where: str) -> None:
    if not isinstance(value, dict):
        raise _Invalid(f"Invalid JSON payload received. {where or 'request'} must be an object.")
    for name in value:
        if name not in fields:
            at = f" at '{where}'" if where else ""
            raise _Invalid(
                f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.'
            )

"""Gemini client: `POST {base}/v1beta/models/{model}:generateContent`, key in `x-goog-api-key`.

A configured model may name its resource (`models/x`, `tunedModels/x`) or only its id (`x`, which
means `models/x`), as the official SDK accepts; only the id is percent-encoded in the path.

Request: `contents: [{parts: [{text: prompt}]}]`, `generationConfig: {responseModalities,
imageConfig: {aspectRatio}, seed}`. Gemini takes an aspect ratio, not pixels: width:height must be
within 3% of a configured ratio (Gemini's own sizes, e.g. 1344x768 for 16:9, are not exact), and
the result's images report the size Gemini actually drew. Seeds are int32 there; Gemini does not
echo the seed, so images report the one sent. One image per call, so `n` must be 1.
negative_prompt, steps, guidance_scale and scheduler have no knob and are not sent.

Answer: images are `candidates[].content.parts[].inlineData {mimeType, data}`. Parsing is
defensive because the model can answer in prose: text parts are collected, `thought` parts
skipped, snake_case keys and `data:` URIs accepted. No image → `content_filtered` when
`promptFeedback.blockReason` or a safety `finishReason` says so, `provider_rejected` with the
model's own words when it only wrote text, `provider_bad_response` otherwise.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import httpx
from pydantic import Field, field_validator

from shared.api.schemas import GeneratedImage, GenerateRequest
from shared.providers.base import BaseProviderClient, ErrorInfo, requested_size
from shared.providers.config import ProviderConfigBase, StrictModel
from shared.providers.errors import (
    ContentFilteredError,
    ProviderAuthError,
    ProviderBadResponseError,
    ProviderError,
    ProviderRejectedError,
    ProviderUnsupportedError,
    scrub,
)
from shared.providers.images import b64_payload, generated_image
from shared.providers.reliability import Deadline, parse_retry_after

API_VERSION = "v1beta"
Modality = Literal["TEXT", "IMAGE"]
DEFAULT_MODALITIES: list[Modality] = ["IMAGE"]
ASPECT_RATIOS = ["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]
SAFETY_FINISH_REASONS = {
    "SAFETY",
    "IMAGE_SAFETY",
    "PROHIBITED_CONTENT",
    "IMAGE_PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
    "RECITATION",
    "IMAGE_RECITATION",
}
ASPECT_TOLERANCE = math.log(1.03)
INT32_LIMIT = 2**31
# Collections a model resource name may start with, as google-genai's `t_model` accepts them.
MODEL_COLLECTIONS = ("models", "tunedModels")
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)s$")


class GeminiOptions(StrictModel):
    """Gemini `generateContent` options for image-output models."""

    response_modalities: list[Modality] = Field(
        default_factory=lambda: list(DEFAULT_MODALITIES),
        min_length=1,
        description="`generationConfig.responseModalities`; must include IMAGE.",
    )
    aspect_ratios: list[str] = Field(
        default_factory=lambda: list(ASPECT_RATIOS),
        min_length=1,
        description="Aspect ratios the models accept; width:height must reduce to one of them.",
    )

    @field_validator("response_modalities")
    @classmethod
    def _wants_images(cls, value: list[str]) -> list[str]:
        if "IMAGE" not in value:
            raise ValueError(f"response_modalities must include IMAGE; got {value}")
        return value


class GeminiProviderConfig(ProviderConfigBase):
    """A provider speaking Gemini's image-output API."""

    DEFAULT_BASE_URL: ClassVar[str] = "https://generativelanguage.googleapis.com"
    DEFAULT_API_KEY_ENV: ClassVar[str] = "GEMINI_API_KEY"

    kind: Literal["gemini"] = Field(description="Protocol: Gemini `generateContent`.")
    gemini: GeminiOptions = Field(
        default_factory=GeminiOptions, description="Gemini image-output options; defaults if unset."
    )


class GeminiClient(BaseProviderClient):
    config_class = GeminiProviderConfig

    def __init__(
        self, config: GeminiProviderConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        super().__init__(config, transport)
        self._options = config.gemini

    def _auth_headers(self, key: str) -> dict[str, str]:
        # The header, never the `?key=` query form: URLs end up in logs.
        return {"x-goog-api-key": key}

    # -- request --------------------------------------------------------------------------------

    def _payload(self, request: GenerateRequest) -> dict[str, Any]:
        if request.n != 1:
            raise ProviderUnsupportedError(
                f"provider {self.name} draws one image per request; got n={request.n}", param="n"
            )
        config: dict[str, Any] = {"responseModalities": list(self._options.response_modalities)}
        ratio = self._aspect_ratio(request)
        if ratio is not None:
            config["imageConfig"] = {"aspectRatio": ratio}
        if request.seed is not None:
            if request.seed >= INT32_LIMIT:
                raise ProviderUnsupportedError(
                    f"provider {self.name} takes seeds below 2**31; got {request.seed}",
                    param="seed",
                )
            config["seed"] = request.seed
        return {"contents": [{"parts": [{"text": request.prompt}]}], "generationConfig": config}

    def _aspect_ratio(self, request: GenerateRequest) -> str | None:
        size = requested_size(request, self.name)
        if size is None:
            return None
        wanted = math.log(size[0] / size[1])
        best = min(self._options.aspect_ratios, key=lambda ratio: abs(_log_ratio(ratio) - wanted))
        if abs(_log_ratio(best) - wanted) > ASPECT_TOLERANCE:
            raise ProviderUnsupportedError(
                f"provider {self.name} draws aspect ratios {', '.join(self._options.aspect_ratios)}"
                f"; {size[0]}x{size[1]} is none of them (within 3%)",
                param="width",
            )
        return best

    # -- answer ---------------------------------------------------------------------------------

    async def _generate_images(
        self, request: GenerateRequest, request_id: str, budget: Deadline
    ) -> list[GeneratedImage]:
        path = f"/{API_VERSION}/{model_resource(request.model)}:generateContent"
        answer = await self._call_json("POST", path, budget, self._payload(request))
        return self._images(answer, request.seed)

    def _images(self, answer: Any, seed: int | None) -> list[GeneratedImage]:
        if not isinstance(answer, dict):
            raise ProviderBadResponseError(f"provider {self.name} answer is not an object")
        candidates = [c for c in _list(answer.get("candidates")) if isinstance(c, dict)]
        images: list[GeneratedImage] = []
        texts: list[str] = []
        for candidate in candidates:
            for part in _list(_dict(candidate.get("content")).get("parts")):
                if not isinstance(part, dict) or part.get("thought") is True:
                    continue
                data = _inline_image(part)
                if data is not None:
                    images.append(generated_image(b64_payload(data), seed))
                elif isinstance(part.get("text"), str):
                    texts.append(part["text"])
        if images:
            return images
        raise self._no_image_error(answer, candidates, texts)

    def _no_image_error(
        self, answer: dict[str, Any], candidates: list[dict[str, Any]], texts: list[str]
    ) -> ProviderError:
        block = _dict(answer.get("promptFeedback")).get("blockReason")
        reasons = [str(c.get("finishReason")) for c in candidates if c.get("finishReason")]
        safety = [r for r in reasons if r in SAFETY_FINISH_REASONS]
        if block or safety:
            why = f"blockReason {block}" if block else f"finishReason {safety[0]}"
            return ContentFilteredError(f"provider {self.name} refused to draw this ({why})")
        if texts:
            said = scrub(" ".join(texts).strip(), self._api_key)
            return ProviderRejectedError(
                f"provider {self.name} answered with text instead of an image: {said}"
            )
        return ProviderBadResponseError(
            f"provider {self.name} answered without an image (finishReason {reasons or 'none'})"
        )

    # -- probe and errors -----------------------------------------------------------------------

    async def _probe_models(self, budget: Deadline) -> dict[str, str]:
        return {model: await self._probe_model(model, budget) for model in self.config.models}

    async def _probe_model(self, model: str, budget: Deadline) -> str:
        path = f"/{API_VERSION}/{model_resource(model)}"
        try:
            info = await self._call_json_once("GET", path, budget)
        except ProviderUnsupportedError:
            return "unsupported"
        methods = _list(_dict(info).get("supportedGenerationMethods"))
        return "available" if "generateContent" in methods else "unsupported"

    def _parse_error(self, body: Any) -> ErrorInfo | None:
        error = _dict(body).get("error")
        if not isinstance(error, dict):
            return None
        details = [d for d in _list(error.get("details")) if isinstance(d, dict)]
        reason = next((d.get("reason") for d in details if d.get("@type") == _ERROR_INFO), None)
        delay = next((d.get("retryDelay") for d in details if d.get("@type") == _RETRY_INFO), None)
        return ErrorInfo(
            message=str(error.get("message") or "no message"),
            code=reason or error.get("status"),
            retry_after=_duration_s(delay),
        )

    def _classify_error(self, status: int, info: ErrorInfo) -> type[ProviderError] | None:
        # Gemini answers a bad key with 400 INVALID_ARGUMENT; only the reason tells them apart.
        if info.code in ("API_KEY_INVALID", "PERMISSION_DENIED", "UNAUTHENTICATED"):
            return ProviderAuthError
        return None


def model_resource(model: str) -> str:
    """The resource name of a configured model: `models/x` for `x`, names with a collection kept.

    The collection prefix stays a path segment; the id is encoded so it cannot add segments.
    """
    collection, slash, model_id = model.partition("/")
    if not slash or collection not in MODEL_COLLECTIONS:
        collection, model_id = "models", model
    return f"{collection}/{quote(model_id, safe='')}"


def _log_ratio(ratio: str) -> float:
    width, _, height = ratio.partition(":")
    return math.log(float(width) / float(height))


def _inline_image(part: dict[str, Any]) -> str | None:
    inline = part.get("inlineData") or part.get("inline_data")
    if not isinstance(inline, dict) or not isinstance(inline.get("data"), str):
        return None
    mime = inline.get("mimeType") or inline.get("mime_type") or "image/"
    return inline["data"] if str(mime).startswith("image/") else None


def _duration_s(value: Any) -> float | None:
    """A google.protobuf.Duration in JSON form ("1.5s")."""
    match = _SECONDS.match(value) if isinstance(value, str) else None
    return parse_retry_after(match.group(1)) if match else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []

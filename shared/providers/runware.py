"""Runware client: `POST {base}/v1` with a JSON array of tasks, Bearer auth.

One `imageInference` task per request: `taskType, taskUUID, model (AIR id), positivePrompt,
negativePrompt, width, height, steps, CFGScale, scheduler, seed, numberResults, outputType,
outputFormat, safety: {checkContent}` (`safety` replaced the deprecated `checkNSFW`). Every attempt
is a new task with a fresh uuid4 taskUUID: Runware wants taskUUIDs unique per task, and an
attempt after a failure is a new task to it. Answer: `{data: [{taskUUID, imageUUID, imageURL |
imageBase64Data | imageDataURI, seed, cost, NSFWContent}], errors: [{code, message, parameter,
taskUUID}]}`; errors may come with a 200 when tasks fail independently.

Only what the request asked for is sent: `steps` and `CFGScale` only when the client set them
(`GenerateRequest.guidance_scale` has a default of ours, which must not override each Runware
model's own), so the model's defaults apply otherwise. Runware needs a size, so a request without
one gets the configured default; the seeds Runware used are returned on each image. An image
flagged `NSFWContent` (Runware blacks it out) answers `content_filtered` rather than a black
picture.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field

from shared.api.schemas import GeneratedImage, GenerateRequest
from shared.api.vocabulary import SchedulerName
from shared.providers.base import BaseProviderClient, ErrorInfo, requested_size
from shared.providers.config import ProviderConfigBase, StrictModel
from shared.providers.errors import (
    ContentFilteredError,
    ProviderAuthError,
    ProviderBadResponseError,
    ProviderError,
    ProviderQuotaError,
    ProviderRejectedError,
    ProviderTimeoutError,
    ProviderUnsupportedError,
)
from shared.providers.images import b64_payload, generated_image
from shared.providers.reliability import Deadline

# Our sampler names in Runware's own (A1111-style) scheduler vocabulary.
RUNWARE_SCHEDULERS: dict[SchedulerName, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "unipc": "UniPC",
}
TASKS_PATH = "/v1"
MIN_SEED = 1
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPG", "webp": "WEBP"}
_ERROR_CLASSES: dict[str, type[ProviderError]] = {
    "invalidApiKey": ProviderAuthError,
    "missingApiKey": ProviderAuthError,
    "insufficientCredits": ProviderQuotaError,
    "timeoutProvider": ProviderTimeoutError,
}


class RunwareOptions(StrictModel):
    """Runware `imageInference` task options."""

    output_type: Literal["base64Data", "dataURI", "URL"] = Field(
        default="base64Data", description="`outputType`; URLs are downloaded with the same client."
    )
    check_content: bool = Field(
        default=True,
        description="Send `safety: {checkContent: true}`; a flagged image answers "
        "`content_filtered`.",
    )
    default_width: int = Field(
        default=1024,
        ge=128,
        le=2048,
        multiple_of=64,
        description="`width` when a request omits it.",
    )
    default_height: int = Field(
        default=1024,
        ge=128,
        le=2048,
        multiple_of=64,
        description="`height` when a request omits it.",
    )


class RunwareProviderConfig(ProviderConfigBase):
    """A provider speaking Runware's task API."""

    DEFAULT_BASE_URL: ClassVar[str] = "https://api.runware.ai"
    DEFAULT_API_KEY_ENV: ClassVar[str] = "RUNWARE_API_KEY"

    kind: Literal["runware"] = Field(description="Protocol: Runware's task API.")
    runware: RunwareOptions = Field(
        default_factory=RunwareOptions,
        description="Runware `imageInference` options; defaults if unset.",
    )


class RunwareClient(BaseProviderClient):
    config_class = RunwareProviderConfig

    def __init__(
        self, config: RunwareProviderConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        super().__init__(config, transport)
        self._options = config.runware

    def _task_fields(self, request: GenerateRequest) -> dict[str, Any]:
        """The task without its type and taskUUID, checked before anything is sent."""
        options = self._options
        width, height = requested_size(request, self.name) or (
            options.default_width,
            options.default_height,
        )
        asked = request.model_fields_set
        task: dict[str, Any] = {
            "model": request.model,
            "positivePrompt": request.prompt,
            "negativePrompt": request.negative_prompt,
            "width": width,
            "height": height,
            "steps": request.steps,
            "CFGScale": request.guidance_scale if "guidance_scale" in asked else None,
            "scheduler": self._scheduler(request.scheduler),
            "seed": self._seed(request.seed),
            "numberResults": request.n,
            "outputType": options.output_type,
            "outputFormat": OUTPUT_FORMATS[request.output_format],
            "safety": {"checkContent": True} if options.check_content else None,
        }
        return {key: value for key, value in task.items() if value is not None}

    def _scheduler(self, name: SchedulerName | None) -> str | None:
        if name is None:
            return None
        if name not in RUNWARE_SCHEDULERS:
            raise ProviderUnsupportedError(
                f"provider {self.name} has no sampler for scheduler {name!r}; it maps "
                f"{', '.join(RUNWARE_SCHEDULERS)}",
                param="scheduler",
            )
        return RUNWARE_SCHEDULERS[name]

    def _seed(self, seed: int | None) -> int | None:
        # Runware's seeds start at 1. Seed 0 is a valid seed of ours that Runware cannot draw:
        # leaving it out would draw a random image for a caller who asked for a reproducible one,
        # and sending 1 instead would silently change the input, so it is refused.
        if seed is not None and seed < MIN_SEED:
            raise ProviderUnsupportedError(
                f"provider {self.name} takes seeds from {MIN_SEED} (Runware's minimum); got {seed}",
                param="seed",
            )
        return seed

    async def _generate_images(
        self, request: GenerateRequest, request_id: str, budget: Deadline
    ) -> list[GeneratedImage]:
        fields = self._task_fields(request)
        task_uuids: list[str] = []

        def tasks() -> list[dict[str, Any]]:
            task_uuids.append(str(uuid.uuid4()))
            return [{"taskType": "imageInference", "taskUUID": task_uuids[-1]} | fields]

        answer = await self._call_json("POST", TASKS_PATH, budget, payload_for_attempt=tasks)
        task_uuid = task_uuids[-1]
        self._raise_task_errors(answer, task_uuid)
        results = _task_results(answer, task_uuid)
        if not results:
            raise ProviderBadResponseError(
                f"provider {self.name} answered without a result for task {task_uuid}"
            )
        return [await self._image(result, budget) for result in results]

    async def _image(self, result: dict[str, Any], budget: Deadline) -> GeneratedImage:
        if result.get("NSFWContent") is True:
            raise ContentFilteredError(
                f"provider {self.name} flagged the image as NSFW (safety.checkContent) and "
                "withheld it"
            )
        seed = result.get("seed") if isinstance(result.get("seed"), int) else None
        for field in ("imageBase64Data", "imageDataURI"):
            if isinstance(result.get(field), str):
                return generated_image(b64_payload(result[field]), seed)
        if isinstance(result.get("imageURL"), str):
            return generated_image(await self._download(result["imageURL"], budget), seed)
        raise ProviderBadResponseError(
            f"provider {self.name} result has no imageBase64Data, imageDataURI or imageURL"
        )

    def _raise_task_errors(self, answer: Any, task_uuid: str) -> None:
        """A 200 can still carry errors for individual tasks; ours fails the call."""
        errors = answer.get("errors") if isinstance(answer, dict) else None
        for error in errors or []:
            if isinstance(error, dict) and error.get("taskUUID") in (None, task_uuid):
                info = _error_info(error)
                cls = self._classify_error(200, info) or ProviderRejectedError
                raise cls(self._failure_message(200, info, cls), param=info.param, retryable=False)

    async def _probe_models(self, budget: Deadline) -> dict[str, str]:
        # Runware has no cheap model listing over REST; a ping task proves reachability and auth.
        # Models cannot be confirmed that way, so they stay "unknown".
        await budget.run(
            lambda: self._send("POST", TASKS_PATH, [{"taskType": "ping", "ping": True}]),
            f"provider {self.name} probe",
        )
        return dict.fromkeys(self.config.models, "unknown")

    def _parse_error(self, body: Any) -> ErrorInfo | None:
        errors = body.get("errors") if isinstance(body, dict) else None
        if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
            return None
        return _error_info(errors[0])

    def _classify_error(self, status: int, info: ErrorInfo) -> type[ProviderError] | None:
        return _ERROR_CLASSES.get(info.code or "")


def _error_info(error: dict[str, Any]) -> ErrorInfo:
    return ErrorInfo(
        message=str(error.get("message") or "no message"),
        code=error.get("code"),
        param=error.get("parameter"),
    )


def _task_results(answer: Any, task_uuid: str) -> list[dict[str, Any]]:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        return []
    return [item for item in data if isinstance(item, dict) and item.get("taskUUID") == task_uuid]

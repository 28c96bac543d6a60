"""The public contract: the generation request, its response, and the stream events.

The same objects flow through Ray `DeploymentHandle`s and are encoded per HTTP content type by the
Router (JSON, NDJSON, SSE). Static shape rules live here; limits that come from configuration are
checked by `shared.api.validation`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.api.vocabulary import ImageFormat, PreviewKind, SchedulerName


class GenerateRequest(BaseModel):
    """One image-generation request; fields left out take the model's configured defaults."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="Model id from /v1/models.")
    prompt: str = Field(min_length=1, description="What to draw.")
    negative_prompt: str | None = Field(default=None, description="What to steer away from.")
    width: int | None = Field(default=None, description="Multiple of 8; model default if unset.")
    height: int | None = Field(default=None, description="Multiple of 8; model default if unset.")
    steps: int | None = Field(default=None, description="Denoising steps; model default if unset.")
    guidance_scale: float = Field(
        default=5.0, description="Classifier-free guidance; <=1 disables."
    )
    seed: int | None = Field(
        default=None, ge=0, lt=2**63, description="Seed of the first image; image i uses seed+i."
    )
    scheduler: SchedulerName | None = Field(
        default=None, description="Sampler name; the model's default if unset."
    )
    n: int = Field(default=1, description="Number of images.")
    preview: PreviewKind = Field(default="none", description="Preview decoder for step events.")
    preview_every: int = Field(default=1, ge=1, description="Send a preview every k steps.")
    output_format: ImageFormat = Field(default="png", description="Encoding of final images.")
    stream: bool = Field(default=False, description="Stream step events (NDJSON or SSE).")


class EncodedImage(BaseModel):
    b64: str
    format: ImageFormat
    width: int
    height: int


class GeneratedImage(EncodedImage):
    seed: int | None = None


class Timings(BaseModel):
    queue_ms: float = 0.0
    encode_ms: float = 0.0
    denoise_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0


class GenerateResponse(BaseModel):
    id: str
    model: str
    backend: str
    images: list[GeneratedImage]
    timings: Timings
    spilled_over: bool = False


class QueuedEvent(BaseModel):
    """The first event of a local request: where it stands in its replica's step batcher."""

    event: Literal["queued"] = "queued"
    id: str
    position: int = Field(
        description="Requests queued ahead of this one that have not started; how long they "
        "and the running ones keep it waiting is `eta_ms`."
    )
    eta_ms: float | None = Field(
        description="Estimated milliseconds to this request's first step, from step times "
        "measured on the replica (null before any step was measured)."
    )


class StepEvent(BaseModel):
    event: Literal["step"] = "step"
    id: str
    index: int = Field(description="1-based step number.")
    total: int
    elapsed_ms: float = Field(description="Milliseconds since denoising began.")
    step_ms: float
    previews: list[EncodedImage] = Field(default_factory=list)


class ResultEvent(GenerateResponse):
    event: Literal["result"] = "result"

    def to_response(self) -> GenerateResponse:
        return GenerateResponse(**self.model_dump(exclude={"event"}))


class ErrorBody(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorEnvelope(BaseModel):
    """Every error answer's body (OpenAI's envelope)."""

    error: ErrorBody


class ErrorEvent(BaseModel):
    event: Literal["error"] = "error"
    id: str
    error: ErrorBody


class ModelCard(BaseModel):
    """One entry of GET /v1/models (OpenAI's list shape plus our backend and state)."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "diffusion-serve"
    backend: str
    loaded: bool
    state: dict[str, Any] = Field(default_factory=dict)


# Every event a generation's stream can carry, in the order they come.
Event = QueuedEvent | StepEvent | ResultEvent | ErrorEvent

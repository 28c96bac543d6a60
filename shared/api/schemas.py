"""The public contract: the generation request, its response, and the stream events.

The same objects flow through Ray `DeploymentHandle`s and are encoded per HTTP content type by the
Router (JSON, NDJSON, SSE). Static shape rules live here; limits that come from configuration are
checked by `shared.intake.resolve`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.api.vocabulary import (
    ImageFormat,
    NoiseMaskName,
    Preprocessor,
    PreviewKind,
    SchedulerName,
)


class FieldConflict(ValueError):
    """A rule between fields, naming the field to fix (validation reports it as `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


IMAGE_FIELD = (
    "base64 image or a `data:` URL (PNG, JPEG or WebP; remote URLs are refused). Fitted to the "
    "request size by scaling to cover it and cropping the centre; sets the size when the request "
    "gives none."
)

# The top-level image inputs of a GenerateRequest (a custom noise mask is `noise_mask.image`, a
# control image `controlnet.{i}.image`).
IMAGE_INPUTS = ("init_image", "mask", "start_image", "image_prompt")


class NoiseMaskSpec(BaseModel):
    """Extra seeded noise injected inside a mask between two fractions of the schedule."""

    model_config = ConfigDict(extra="forbid")

    pattern: NoiseMaskName | None = Field(
        default=None, description="A named pattern from GET /v1/noise-masks (circle, square, ...)."
    )
    image: str | None = Field(
        default=None,
        description="A custom mask instead of a pattern (white = noise); " + IMAGE_FIELD,
    )
    strength: float = Field(
        default=0.5,
        ge=0.0,
        le=2.0,
        description="Injected noise as a multiple of the current sigma.",
    )
    start: float = Field(default=0.0, ge=0.0, le=1.0, description="Fraction of steps to begin at.")
    end: float = Field(default=1.0, ge=0.0, le=1.0, description="Fraction of steps to stop at.")
    invert: bool = Field(default=False, description="Inject outside the mask instead.")

    @model_validator(mode="after")
    def _one_source(self) -> NoiseMaskSpec:
        if (self.pattern is None) == (self.image is None):
            raise FieldConflict("pattern", "give exactly one of pattern and image")
        if self.start >= self.end:
            raise FieldConflict("start", f"start ({self.start}) must be below end ({self.end})")
        return self


class LoraSpec(BaseModel):
    """One LoRA of a request: a LoRA configured for the model, and its weight."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200, description="A LoRA id from /v1/capabilities.")
    scale: float = Field(default=1.0, ge=-4.0, le=4.0, description="Its weight; 0 = off.")


class ControlNetSpec(BaseModel):
    """One ControlNet of a request: a ControlNet configured for the model, its control image,
    and when and how strongly it steers."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        min_length=1, max_length=200, description="A ControlNet id from /v1/capabilities."
    )
    image: str = Field(
        description="The control image (an edge map, or a photo with `preprocessor: canny`): "
        + IMAGE_FIELD
    )
    scale: float = Field(
        default=1.0,
        ge=0.0,
        le=2.0,
        description="Its weight (diffusers' `controlnet_conditioning_scale`); 0 = off.",
    )
    start: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the schedule it begins to steer at (`control_guidance_start`).",
    )
    end: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the schedule it stops steering at (`control_guidance_end`).",
    )
    preprocessor: Preprocessor = Field(
        default="none",
        description="`none`: the image is the control map; `canny`: OpenCV's Canny edges of "
        "the image, fitted to the request size, are.",
    )
    low_threshold: int = Field(
        default=100, ge=0, le=255, description="Canny's lower hysteresis threshold."
    )
    high_threshold: int = Field(
        default=200, ge=0, le=255, description="Canny's upper hysteresis threshold."
    )

    @model_validator(mode="after")
    def _ordered(self) -> ControlNetSpec:
        if self.start >= self.end:
            raise FieldConflict("end", f"end ({self.end}) must be above start ({self.start})")
        if self.low_threshold > self.high_threshold:
            raise FieldConflict(
                "high_threshold",
                f"high_threshold ({self.high_threshold}) must be at least low_threshold "
                f"({self.low_threshold})",
            )
        return self


class RefinerSpec(BaseModel):
    """Hand the end of the schedule to the model's SDXL refiner (ensemble of experts); every
    field left out is the model's configured default."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, max_length=200, description="The refiner's id; the model's own if unset."
    )
    switch_at: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Share of the schedule the base runs before the refiner takes over "
        "(diffusers' `denoising_end` / `denoising_start`).",
    )
    aesthetic_score: float | None = Field(
        default=None, ge=0.0, le=10.0, description="The refiner's aesthetic conditioning."
    )
    negative_aesthetic_score: float | None = Field(
        default=None, ge=0.0, le=10.0, description="Its value on the negative rows."
    )


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
    init_image: str | None = Field(
        default=None, description="img2img / inpainting source image: " + IMAGE_FIELD
    )
    strength: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="How much of the init image is repainted: the first 1-strength of the "
        "schedule is skipped (diffusers' semantics). Default 0.8 for img2img, 1.0 for inpainting.",
    )
    mask: str | None = Field(
        default=None,
        description="Inpainting mask for init_image, white = repaint (diffusers' convention): "
        + IMAGE_FIELD,
    )
    mask_blur: float = Field(
        default=0.0, ge=0.0, le=64.0, description="Gaussian blur radius applied to the mask."
    )
    start_image: str | None = Field(
        default=None,
        description="Start the full schedule from this image's latents mixed with noise: "
        + IMAGE_FIELD,
    )
    start_noise: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Noise share of the start latents: 0 = the image alone, 1 = pure noise "
        "(default 0.7).",
    )
    noise_mask: NoiseMaskSpec | None = Field(
        default=None, description="Inject extra noise inside a mask during part of the schedule."
    )
    image_prompt: str | None = Field(
        default=None,
        description="An image as (part of) the prompt, through the model's IP-Adapter: "
        "base64 or a `data:` URL.",
    )
    image_prompt_scale: float = Field(
        default=1.0, ge=0.0, le=2.0, description="Weight of the image prompt (IP-Adapter scale)."
    )
    loras: list[LoraSpec] = Field(
        default_factory=list, description="LoRAs to apply, each with its scale."
    )
    refiner: RefinerSpec | None = Field(
        default=None, description="Finish the schedule with the model's refiner."
    )
    controlnet: list[ControlNetSpec] = Field(
        default_factory=list,
        description="ControlNets to steer with, each with its control image, scale and span of "
        "the schedule.",
    )

    @model_validator(mode="after")
    def _image_inputs_agree(self) -> GenerateRequest:
        if self.init_image is None:
            for name in ("mask", "strength"):
                if getattr(self, name) is not None:
                    raise FieldConflict(name, f"{name} needs an init_image")
        if self.start_image is not None and self.init_image is not None:
            raise FieldConflict("start_image", "give init_image or start_image, not both")
        if self.start_image is None and self.start_noise is not None:
            raise FieldConflict("start_noise", "start_noise needs a start_image")
        ids = [lora.id for lora in self.loras]
        if len(set(ids)) != len(ids):
            raise FieldConflict("loras", "each LoRA may appear once in loras")
        ids = [control.id for control in self.controlnet]
        if len(set(ids)) != len(ids):
            raise FieldConflict("controlnet", "each ControlNet may appear once in controlnet")
        return self

    @property
    def image_fields(self) -> dict[str, str]:
        """The request's image inputs by field name (what a provider model cannot take)."""
        # "" is an image field given empty, refused by the intake (`empty_image`); only null or
        # an absent field means no image.
        images = {n: getattr(self, n) for n in IMAGE_INPUTS if getattr(self, n) is not None}
        if self.noise_mask is not None and self.noise_mask.image is not None:
            images["noise_mask.image"] = self.noise_mask.image
        for index, control in enumerate(self.controlnet):
            images[f"controlnet.{index}.image"] = control.image
        return images


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


class ImageDigest(BaseModel):
    """An input image as a request record keeps it: what was decoded, not its bytes."""

    sha256: str = Field(
        description="sha256 of the decoded pixels: the image's raw bytes in its decoded mode "
        "(RGB, RGBA or L), row by row, after EXIF orientation; the same for the same pixels "
        "whatever the file format."
    )
    width: int = Field(description="The image's own width, before it is fitted to the request.")
    height: int


class RequestRecord(BaseModel):
    """A resolved request without its image payloads: every default filled in (size, steps,
    sampler, seed, strength, start_noise, each ControlNet's), each image field null and listed
    in `images`."""

    request: dict[str, Any] = Field(
        default_factory=dict,
        description="The resolved GenerateRequest's fields. Sent back to /v1/generate (with the "
        "image fields given again) it reproduces the result.",
    )
    images: dict[str, ImageDigest] = Field(
        default_factory=dict,
        description="The request's image inputs by field (`noise_mask.image` for a custom noise "
        "mask, `controlnet.{i}.image` for a control image).",
    )


class SchedulerRecord(BaseModel):
    """The diffusers scheduler a job ran with."""

    class_name: str = Field(description="The diffusers class, e.g. EulerDiscreteScheduler.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Its config as diffusers serializes it (`from_config` rebuilds it), but "
        "JSON-safe: a non-finite float (DPM-Solver's `lambda_min_clipped: -inf`) is the string "
        "`float()` reads back (`-Infinity`).",
    )

    @field_validator("config")
    @classmethod
    def _json_safe(cls, config: dict[str, Any]) -> dict[str, Any]:
        return _finite_or_text(config)


def _finite_or_text(value: Any) -> Any:
    """`value` with every non-finite float as JSON's usual spelling, a string (strict JSON, as
    our responses are encoded, has no Infinity or NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite_or_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_text(item) for item in value]
    return value


class ResultMetadata(RequestRecord):
    """What reproduces a local result: the resolved request, the weights, the sampler and the
    software that made it. Small on the wire: digests, never image bytes."""

    components: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="sha256 of every weight and config file, by component (unet, vae, ...) and "
        "file path within it.",
    )
    scheduler: SchedulerRecord | None = None
    versions: dict[str, str] = Field(
        default_factory=dict,
        description="torch, diffusers, transformers, ray, python and diffusion_serve versions "
        "of the replica that ran the job.",
    )


class GenerateResponse(BaseModel):
    id: str
    model: str
    backend: str
    images: list[GeneratedImage]
    timings: Timings
    spilled_over: bool = False
    metadata: ResultMetadata | None = Field(
        default=None,
        description="Reproducibility record of a local result; null for a provider's.",
    )


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

"""What a client asks before it sends work: what each model can do (`GET /v1/capabilities`), the
samplers (`GET /v1/schedulers`), and a dry run of one request (`POST /v1/generate/validate`:
the request as it would run, and what it would cost).

Torch-free: the Router builds these answers from its config and what the replicas and the
ModelCache report; the pure parts (the capability table, the request record, the memory
formula) are functions here so they are tested without Ray.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.api.schemas import IMAGE_INPUTS, GenerateRequest, ImageDigest, RequestRecord
from shared.api.vocabulary import (
    IMAGE_FORMATS,
    PREPROCESSORS,
    PREVIEW_KINDS,
    SAMPLERS,
    SCHEDULER_NAMES,
    ImageFormat,
    Preprocessor,
    PreviewKind,
    SchedulerName,
)
from shared.config import AppConfig, BatchingConfig, LimitsConfig, ModelConfig
from shared.intake.request_images import DecodedImages

# What a provider model refuses at the edge (`check_remote_request`): every image input.
PROVIDER_REFUSED = (*IMAGE_INPUTS, "noise_mask", "controlnet", "loras", "refiner")
# SDXL's VAE turns 8x8 pixels into one latent pixel.
LATENT_SCALE = 8
# Activation elements one UNet batch row keeps alive per latent pixel at its peak (SDXL's widest
# blocks with SDPA attention): about 3.2 GB at fp16 for 1024x1024 with guidance (two rows).
ACTIVATION_ELEMENTS_PER_LATENT_PIXEL = 49_152
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# ---- GET /v1/capabilities ---------------------------------------------------------------------


class RefinerSupport(BaseModel):
    """A model's refiner and the defaults a request's `refiner` fields take."""

    id: str
    switch_at: float = Field(description="Share of the schedule the base runs.")
    aesthetic_score: float
    negative_aesthetic_score: float


class TaskSupport(BaseModel):
    """The kinds of work a model takes, by the request fields that ask for them."""

    txt2img: bool = True
    img2img: bool = Field(True, description="`init_image` (+ `strength`).")
    inpaint: bool = Field(True, description="`init_image` + `mask`.")
    inpainting_unet: bool | None = Field(
        description="True: inpainting runs on a 9-channel inpainting UNet (mask and masked image "
        "are UNet inputs); false: a plain UNet, the unmasked region blended back every step; "
        "null: not known until a replica has built the model."
    )
    start_image: bool = Field(True, description="`start_image` (+ `start_noise`).")
    noise_mask: bool = Field(True, description="`noise_mask`.")
    image_prompt: bool = Field(description="`image_prompt`: the model has an IP-Adapter.")
    controlnet: bool = Field(description="`controlnet`: the model configures ControlNets.")
    refiner: bool = Field(description="`refiner`: the model configures an SDXL refiner.")


class ControlNetSupport(BaseModel):
    """A ControlNet `controlnet` may name, and the preprocessors its control image may take."""

    id: str = Field(description="What `controlnet[].id` takes.")
    preprocessors: list[Preprocessor] = Field(
        description="`controlnet[].preprocessor` values: `none` (the image is the control map) "
        "or `canny` (OpenCV's Canny edges of it)."
    )


class ModelRuntime(BaseModel):
    """Where the model runs, as an SDXLPipeline replica reports it."""

    device: str = Field(description="`cuda` or `cpu`.")
    gpu_ids: list[str] = Field(description="The GPUs Ray assigned the replica (empty on CPU).")
    dtype: str = Field(description="Compute dtype of the UNet (the model's configured dtype).")
    vae_dtype: str = Field(description="The VAE (and tiny preview decoder) decode in this.")
    built: bool = Field(description="Whether the reporting replica has built this model.")


class LocalModelCapabilities(BaseModel):
    id: str
    backend: Literal["local"] = "local"
    tasks: TaskSupport
    samplers: list[SchedulerName] = Field(description="Names `scheduler` takes.")
    default_sampler: SchedulerName | None = Field(
        description="The sampler a request without `scheduler` gets; null: the checkpoint's own "
        "scheduler (a result's `metadata.scheduler` names its class)."
    )
    preview_kinds: list[PreviewKind] = Field(
        description="`preview` values; `tiny` only where the model has a tiny preview decoder."
    )
    output_formats: list[ImageFormat]
    loras: list[str] = Field(description="LoRA ids `loras` may name.")
    controlnets: list[ControlNetSupport] = Field(
        default_factory=list, description="ControlNets `controlnet` may name."
    )
    refiner: RefinerSupport | None = Field(
        default=None, description="The refiner `refiner` hands the schedule's end to, if any."
    )
    default_width: int | None = Field(
        description="A request's width when it gives none (and no init/start image); null: the "
        "checkpoint's own, not known until its weights are in the cache."
    )
    default_height: int | None
    default_steps: int
    runtime: ModelRuntime


class ProviderModelCapabilities(BaseModel):
    id: str = Field(description="`provider/model`, as requests name it.")
    backend: str = Field(description="The provider's configured name.")
    kind: str = Field(description="The provider's API (openai, runware, gemini, parasail).")
    tasks: list[Literal["txt2img"]] = Field(["txt2img"], description="Text to image only.")
    refuses: list[str] = Field(
        default_factory=lambda: list(PROVIDER_REFUSED),
        description="Request fields answered with 422 `unsupported_for_provider`.",
    )


class CapabilitiesResponse(BaseModel):
    """Every model this server routes to, and the limits every request is held to."""

    object: Literal["capabilities"] = "capabilities"
    models: list[LocalModelCapabilities]
    provider_models: list[ProviderModelCapabilities]
    limits: LimitsConfig = Field(description="Enforced on every request (4xx beyond them).")
    batching: BatchingConfig = Field(description="The replicas' step batcher.")


def build_capabilities(
    config: AppConfig,
    runtimes: dict[str, dict[str, Any]],
    engines: dict[str, dict[str, bool]],
    sizes: dict[str, tuple[int, int] | None],
) -> CapabilitiesResponse:
    """The capability table. `runtimes` are the replicas' `ModelRuntime` fields by model,
    `engines` what a built engine showed (`inpainting_unet`, `tiny_preview`) where one was
    built, `sizes` the checkpoints' own (width, height) where known."""
    models = [
        _local(model, runtimes[model.id], engines.get(model.id), sizes.get(model.id))
        for model in config.models
    ]
    providers = [
        ProviderModelCapabilities(id=f"{p.name}/{name}", backend=p.name, kind=p.kind)
        for p in config.providers
        for name in p.models
    ]
    return CapabilitiesResponse(
        models=models, provider_models=providers, limits=config.limits, batching=config.batching
    )


def _local(
    model: ModelConfig,
    runtime: dict[str, Any],
    engine: dict[str, bool] | None,
    size: tuple[int, int] | None,
) -> LocalModelCapabilities:
    # A configured decoder can still be missing from its source (the loader leaves it out), which
    # only a built engine shows.
    tiny = model.preview_decoder is not None and (engine or {}).get("tiny_preview", True)
    width, height = size or (None, None)
    return LocalModelCapabilities(
        id=model.id,
        tasks=TaskSupport(
            inpainting_unet=None if engine is None else engine["inpainting_unet"],
            image_prompt=model.ip_adapter is not None,
            controlnet=bool(model.controlnets),
            refiner=model.refiner is not None,
        ),
        samplers=list(SCHEDULER_NAMES),
        default_sampler=model.default_scheduler,
        preview_kinds=[kind for kind in PREVIEW_KINDS if kind != "tiny" or tiny],
        output_formats=list(IMAGE_FORMATS),
        loras=[lora.id for lora in model.loras],
        controlnets=[
            ControlNetSupport(id=control.id, preprocessors=list(PREPROCESSORS))
            for control in model.controlnets
        ],
        refiner=(
            RefinerSupport(
                id=model.refiner.id,
                switch_at=model.refiner.switch_at,
                aesthetic_score=model.refiner.aesthetic_score,
                negative_aesthetic_score=model.refiner.negative_aesthetic_score,
            )
            if model.refiner is not None
            else None
        ),
        default_width=model.default_width or width,
        default_height=model.default_height or height,
        default_steps=model.default_steps,
        runtime=ModelRuntime(**runtime),
    )


# ---- GET /v1/schedulers -----------------------------------------------------------------------


class SchedulerInfo(BaseModel):
    name: SchedulerName = Field(description="What a request puts in `scheduler`.")
    class_name: str = Field(description="The diffusers scheduler class.")
    options: dict[str, Any] = Field(
        description="Set on top of the checkpoint's own scheduler config (`from_config`)."
    )


class SchedulerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SchedulerInfo]


def scheduler_list() -> SchedulerList:
    return SchedulerList(
        data=[
            SchedulerInfo(name=name, class_name=class_name, options=options)
            for name, (class_name, options) in SAMPLERS.items()
        ]
    )


# ---- POST /v1/generate/validate ---------------------------------------------------------------


class Estimate(BaseModel):
    """What the request would cost now. Estimates, not promises."""

    queue_ms: float | None = Field(
        default=None,
        description="Until its first step on the replica that would take it: that replica's "
        "queue played forward with its measured step time. Null before the replica measured a "
        "step, and for provider models.",
    )
    run_ms: float | None = Field(
        default=None,
        description="Its denoising steps (those `strength` keeps) times the step time measured "
        "for its size (the nearest measured size, scaled by pixels); decoding is not included. "
        "Null as queue_ms.",
    )
    peak_memory_bytes: int | None = Field(
        default=None,
        description="weights + rows x latent pixels x 49152 x dtype bytes: the model's weights "
        "as the ModelCache holds them (all its components: an upper bound), plus activations for "
        "its batch rows (n, twice with guidance > 1) over (width/8)*(height/8) latent pixels. "
        "Null while the weights are not cached, and for provider models.",
    )


class ValidateResponse(RequestRecord):
    """The request as /v1/generate would run it, and what it would cost."""

    estimate: Estimate


def peak_memory_bytes(
    weights_bytes: int, n: int, guidance_scale: float, width: int, height: int, dtype: str
) -> int:
    """Estimated peak device memory of one request: see `Estimate.peak_memory_bytes`."""
    rows = n * (2 if guidance_scale > 1.0 else 1)
    latent_pixels = (width // LATENT_SCALE) * (height // LATENT_SCALE)
    activations = rows * latent_pixels * ACTIVATION_ELEMENTS_PER_LATENT_PIXEL * DTYPE_BYTES[dtype]
    return weights_bytes + activations


def request_record(request: GenerateRequest, images: DecodedImages) -> RequestRecord:
    """The resolved request without image payloads: each image field null, its digest listed.
    Hashes every image: call it off the event loop."""
    fields = request.model_dump(mode="json")
    digests: dict[str, ImageDigest] = {}
    for param in request.image_fields:
        if param == "noise_mask.image":
            fields["noise_mask"]["image"] = None
            image = images.noise_mask
        elif param.startswith("controlnet."):
            index = int(param.split(".")[1])
            fields["controlnet"][index]["image"] = None
            image = images.controlnets[index]
        else:
            fields[param] = None
            image = getattr(images, param)
        assert image is not None, f"{param} was not decoded"
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        digests[param] = ImageDigest(sha256=digest, width=image.width, height=image.height)
    return RequestRecord(request=fields, images=digests)

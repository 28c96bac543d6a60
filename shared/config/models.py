"""Per-model configuration (`models:` entries) and the request limits the Router enforces."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from shared.api.vocabulary import SchedulerName
from shared.config.base import StrictConfig


class LimitsConfig(StrictConfig):
    """Request limits enforced by the Router before any work is queued."""

    min_side: int = Field(64, ge=8, le=8192, description="Smallest width/height in pixels.")
    max_side: int = Field(2048, ge=8, le=8192, description="Largest width/height in pixels.")
    max_pixels: int = Field(
        1024 * 1024 * 2, ge=64, le=8192 * 8192, description="Largest width*height per image."
    )
    max_steps: int = Field(100, ge=1, le=1000, description="Most denoising steps per request.")
    max_n: int = Field(4, ge=1, le=64, description="Most images per request.")
    max_guidance_scale: float = Field(30.0, ge=0, le=100, description="Largest guidance scale.")
    max_prompt_chars: int = Field(2000, ge=1, le=100_000, description="Longest prompt (chars).")
    max_body_bytes: int = Field(
        20_000_000,
        ge=1024,
        le=200_000_000,
        description="Largest HTTP request body in bytes (sized for base64 images).",
    )
    max_image_bytes: int = Field(
        10_000_000,
        ge=1024,
        le=100_000_000,
        description="Largest encoded image file (PNG/JPEG/WebP bytes) in a request.",
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=64,
        le=8192 * 8192,
        description="Largest width*height of an input image, read from its header before "
        "decoding (far below Pillow's decompression-bomb limit).",
    )
    preview_max_side: int = Field(256, ge=16, le=2048, description="Longest side of a preview.")
    max_loras: int = Field(4, ge=0, le=16, description="Most LoRAs one request may apply.")
    max_controlnets: int = Field(
        3, ge=0, le=8, description="Most ControlNets one request may apply."
    )
    # ---- JSON bodies: checked while parsing, so no parser exception ever escapes.
    max_json_depth: int = Field(
        32, ge=4, le=512, description="Deepest nesting of objects and arrays in a JSON body."
    )
    max_json_number_chars: int = Field(
        64, ge=20, le=4000, description="Longest number literal in a JSON body (characters)."
    )
    max_json_array_items: int = Field(
        1024, ge=16, le=1_000_000, description="Most items in one JSON array."
    )
    max_json_object_keys: int = Field(
        256, ge=16, le=100_000, description="Most keys in one JSON object."
    )
    max_json_key_chars: int = Field(
        256, ge=16, le=100_000, description="Longest key in a JSON object (characters)."
    )
    # ---- input images: checked from the file's bytes before any pixel is decoded.
    min_image_side: int = Field(
        8, ge=1, le=1024, description="Shortest side an input image may have, in pixels."
    )
    max_image_aspect: float = Field(
        16.0,
        ge=1.0,
        le=1024.0,
        description="Largest ratio of an input image's long side to its short side.",
    )
    max_jpeg_scans: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Most scans (SOS markers) in a JPEG: a progressive file's decode cost grows "
        "with them (encoders write about 10).",
    )
    max_png_chunks: int = Field(
        4096,
        ge=8,
        le=1_000_000,
        description="Most chunks in a PNG (encoders write one IDAT per 8-64 KB), and most "
        "marker segments in a JPEG or chunks in a WebP.",
    )
    max_image_metadata_bytes: int = Field(
        1_000_000,
        ge=1024,
        le=100_000_000,
        description="Most bytes of metadata in an input image, in total: PNG ancillary chunks "
        "(compressed text and ICC profiles counted inflated), JPEG APPn/COM segments, WebP "
        "EXIF/ICCP/XMP chunks.",
    )
    max_image_frames: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Most frames in an animated PNG or WebP (only the first is used).",
    )
    decode_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Threads that decode input images, per Router replica; unset = CPU cores. "
        "They run at a lower CPU priority than the event loop.",
    )
    decode_wait_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="Longest a request waits for a free decode worker before a 429.",
    )
    decode_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Longest one request's images may take to decode."
    )

    @model_validator(mode="after")
    def _ordered(self) -> LimitsConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) exceeds max_side ({self.max_side})")
        return self


class IPAdapterConfig(StrictConfig):
    """An IP-Adapter for image prompts, in the h94/IP-Adapter SDXL file layout."""

    source: str = Field(
        min_length=1,
        description="`tiny-ip-adapter` (built in), a local folder, `s3://bucket/prefix`, or an HF "
        "id such as `h94/IP-Adapter`.",
    )
    weight_name: str = Field(
        "sdxl_models/ip-adapter_sdxl.safetensors",
        min_length=1,
        description="The adapter weights (`image_proj.*`, `ip_adapter.*`), relative to source.",
    )
    image_encoder: str = Field(
        "sdxl_models/image_encoder",
        min_length=1,
        description="Folder of the CLIPVisionModelWithProjection, relative to source.",
    )


LORA_PREFIX = "lora:"  # a LoRA's component name in the ModelCache: `lora:<id>`


class LoraConfig(StrictConfig):
    """A LoRA a request may name for its model (`loras: [{id, scale}]`)."""

    id: str = Field(min_length=1, max_length=200, description="Name requests put in `loras`.")
    source: str = Field(
        min_length=1,
        description="`tiny-lora`/`tiny-lora-kohya` (built in), a local file or folder, "
        "`s3://bucket/prefix`, or an HF id.",
    )
    weight_name: str | None = Field(
        None,
        description="The .safetensors file inside a folder or repo source; the only one there "
        "if unset.",
    )

    @property
    def component(self) -> str:
        return f"{LORA_PREFIX}{self.id}"


class RefinerConfig(StrictConfig):
    """The model's SDXL refiner (ensemble of experts), loaded with the model as one suite."""

    id: str = Field(
        min_length=1, max_length=200, description="Name requests put in `refiner.model`."
    )
    source: str = Field(
        min_length=1,
        description="`tiny-refiner` (built in), a local folder, `s3://bucket/prefix`, or an HF id "
        "such as `stabilityai/stable-diffusion-xl-refiner-1.0` (its unet and scheduler are read; "
        "the base's VAE decodes and the base's text encoder 2 conditions it, as in diffusers' "
        "ensemble example).",
    )
    switch_at: float = Field(
        0.8, gt=0.0, lt=1.0, description="Default share of the schedule the base runs."
    )
    aesthetic_score: float = Field(6.0, ge=0.0, le=10.0, description="Default aesthetic score.")
    negative_aesthetic_score: float = Field(
        2.5, ge=0.0, le=10.0, description="Default aesthetic score of the negative rows."
    )


CONTROLNET_PREFIX = "controlnet:"  # a ControlNet's component name: `controlnet:<id>`


class ControlNetConfig(StrictConfig):
    """A ControlNet a request may name for its model (`controlnet: [{id, image, ...}]`)."""

    id: str = Field(min_length=1, max_length=200, description="Name requests put in `controlnet`.")
    source: str = Field(
        min_length=1,
        description="`tiny-controlnet` (built in), a subfolder of the model's source, a local "
        "folder, `s3://bucket/prefix`, or an HF id such as "
        "`diffusers/controlnet-canny-sdxl-1.0` (a diffusers ControlNetModel folder).",
    )

    @property
    def component(self) -> str:
        return f"{CONTROLNET_PREFIX}{self.id}"


class ModelConfig(StrictConfig):
    """One locally served SDXL model."""

    id: str = Field(min_length=1, max_length=200, description="Name clients put in `model`.")
    source: str = Field(
        min_length=1,
        description="`tiny`/`small` (built in), a local folder, `s3://bucket/prefix`, or an HF id.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Compute dtype of UNet and text encoders (the VAE decodes in fp32)."
    )
    variant: str | None = Field(None, description="Weight file variant, e.g. `fp16`.")
    default_width: int | None = Field(
        None,
        ge=8,
        le=8192,
        description="Width when a request omits it; the checkpoint's own if unset (the UNet's "
        "sample_size times the VAE's scale factor: 1024 for SDXL).",
    )
    default_height: int | None = Field(
        None, ge=8, le=8192, description="Height when a request omits it; as default_width."
    )
    default_steps: int = Field(
        30, ge=1, le=1000, description="Steps when a request omits them (30 suits SDXL)."
    )
    default_scheduler: SchedulerName | None = Field(
        None, description="Sampler when a request omits it; the checkpoint's own if unset."
    )
    preview_decoder: str | None = Field(
        "taesd",
        description="AutoencoderTiny for `tiny` previews: a subfolder of the source or another "
        "source (e.g. madebyollin/taesdxl); unset disables them.",
    )
    preload: bool = Field(True, description="Load weights into the object store at startup.")
    allow_pickle: bool = Field(
        False, description="Allow .bin/.pt checkpoints (loaded with weights_only=True)."
    )
    sha256: dict[str, str] = Field(
        default_factory=dict, description="Expected sha256 per file path relative to the source."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec/s3fs options (endpoint_url, anon, client_kwargs.region_name, ...); "
        "credentials come from the environment.",
    )
    loras: list[LoraConfig] = Field(
        default_factory=list,
        description="LoRAs requests may apply (safetensors; kohya/A1111 or diffusers/PEFT keys).",
    )
    refiner: RefinerConfig | None = Field(
        None, description="An SDXL refiner requests may hand the last part of the schedule to."
    )
    controlnets: list[ControlNetConfig] = Field(
        default_factory=list,
        description="ControlNets requests may apply (diffusers ControlNetModel folders).",
    )
    vae: str | None = Field(
        None,
        description="A VAE to use instead of the checkpoint's: a subfolder of the source or "
        "another source (e.g. madebyollin/sdxl-vae-fp16-fix).",
    )
    ip_adapter: IPAdapterConfig | None = Field(
        None, description="IP-Adapter for `image_prompt`; unset refuses image prompts."
    )
    fallback: str | None = Field(
        None, description="Provider model (`provider/model`) to spill over to when busy."
    )

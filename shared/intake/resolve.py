"""Request validation at the edge: JSON body → GenerateRequest → limits of the configured model.

Every failure is an `InvalidRequestError`/`MalformedRequestError` naming the field (`param`) and
saying what is allowed. Nothing is silently "fixed": a height of 1000 is refused, not rounded.
"""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, ValidationError

from shared.api.schemas import FieldConflict, GenerateRequest, RefinerSpec
from shared.config import LimitsConfig, ModelConfig
from shared.errors import InvalidRequestError

# Codes kept from before these fields were literals, so clients that match on them still work.
_LITERAL_CODES = {"scheduler": "unknown_scheduler"}


def parse_request(data: dict[str, Any] | GenerateRequest) -> GenerateRequest:
    """Build a GenerateRequest, turning pydantic's error into our picklable one."""
    if isinstance(data, GenerateRequest):
        return data
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def from_validation_error(
    exc: ValidationError, model: type[BaseModel] = GenerateRequest
) -> InvalidRequestError:
    """pydantic's first error as our picklable one, naming the field and what is allowed."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return InvalidRequestError(
            f"unknown field {param!r}; allowed fields: {allowed}", code="unknown_field", param=param
        )
    if kind == "missing":
        return InvalidRequestError(f"{param} is required", code="missing_field", param=param)
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        return InvalidRequestError(
            f"{param} must be one of {expected}; got {first['input']!r}",
            code=_LITERAL_CODES.get(param or "", "invalid_value"),
            param=param,
        )
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, FieldConflict):  # a rule between fields: name the one to fix
        param = ".".join(filter(None, [param, cause.param]))
        return InvalidRequestError(str(cause), code="invalid_value", param=param)
    return InvalidRequestError(f"{param}: {first['msg']}", code="invalid_value", param=param)


def resolve_request(
    request: GenerateRequest,
    model: ModelConfig,
    limits: LimitsConfig,
    checkpoint_size: tuple[int, int] | None = None,
) -> GenerateRequest:
    """Fill in defaults and enforce configured limits; returns a complete request.

    A side the request leaves out is the model config's default, else the checkpoint's own
    (`checkpoint_size`, width and height: the UNet's sample size times the VAE's scale factor).
    """
    checkpoint_width, checkpoint_height = checkpoint_size or (None, None)
    width = _first_set("width", request.width, model.default_width, checkpoint_width)
    height = _first_set("height", request.height, model.default_height, checkpoint_height)
    filled = request.model_copy(
        update={
            "width": width,
            "height": height,
            "steps": request.steps if request.steps is not None else model.default_steps,
            "scheduler": request.scheduler or model.default_scheduler,
            "seed": request.seed if request.seed is not None else secrets.randbelow(2**32),
        }
    )
    _check_size(filled, limits)
    _check_range("steps", filled.steps or 0, 1, limits.max_steps)
    _check_range("n", filled.n, 1, limits.max_n)
    _check_range("guidance_scale", filled.guidance_scale, 0.0, limits.max_guidance_scale)
    _check_range("preview_every", filled.preview_every, 1, limits.max_steps)
    _check_loras(filled, model, limits)
    _check_controlnets(filled, model, limits)
    if filled.refiner is not None:
        filled.refiner = _resolve_refiner(filled, model)
    for name in ("prompt", "negative_prompt"):
        text = getattr(filled, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(
                f"{name} is {len(text)} characters long; the limit is {limits.max_prompt_chars}",
                code="prompt_too_long",
                param=name,
            )
    return filled


def _resolve_refiner(request: GenerateRequest, model: ModelConfig) -> RefinerSpec:
    """The request's refiner with the model's defaults filled in; refused where there is none or
    the job inpaints (the refiner would repaint what the mask keeps)."""
    spec, refiner = request.refiner, model.refiner
    assert spec is not None
    if refiner is None:
        raise InvalidRequestError(
            f"model {model.id!r} has no refiner configured",
            code="refiner_unsupported",
            param="refiner",
        )
    if spec.model is not None and spec.model != refiner.id:
        raise InvalidRequestError(
            f"unknown refiner {spec.model!r} for model {model.id!r}; its refiner: {refiner.id}",
            code="unknown_refiner",
            param="refiner.model",
        )
    if request.mask is not None:
        raise InvalidRequestError(
            "a refiner cannot finish an inpainting job; drop `refiner` or `mask`",
            code="refiner_unsupported",
            param="refiner",
        )
    return RefinerSpec(
        model=refiner.id,
        switch_at=spec.switch_at if spec.switch_at is not None else refiner.switch_at,
        aesthetic_score=(
            spec.aesthetic_score if spec.aesthetic_score is not None else refiner.aesthetic_score
        ),
        negative_aesthetic_score=(
            spec.negative_aesthetic_score
            if spec.negative_aesthetic_score is not None
            else refiner.negative_aesthetic_score
        ),
    )


def _check_loras(request: GenerateRequest, model: ModelConfig, limits: LimitsConfig) -> None:
    if len(request.loras) > limits.max_loras:
        raise InvalidRequestError(
            f"loras has {len(request.loras)} entries; the limit is {limits.max_loras}",
            code="too_many_loras",
            param="loras",
        )
    known = {lora.id for lora in model.loras}
    for index, lora in enumerate(request.loras):
        if lora.id not in known:
            names = ", ".join(sorted(known)) or "none"
            raise InvalidRequestError(
                f"unknown LoRA {lora.id!r} for model {model.id!r}; its LoRAs: {names}",
                code="unknown_lora",
                param=f"loras.{index}.id",
            )


def check_controlnet_count(request: GenerateRequest, limits: LimitsConfig) -> None:
    """Refuse more ControlNets than the limit; the intake calls it before decoding their images."""
    if len(request.controlnet) > limits.max_controlnets:
        raise InvalidRequestError(
            f"controlnet has {len(request.controlnet)} entries; the limit is "
            f"{limits.max_controlnets}",
            code="too_many_controlnets",
            param="controlnet",
        )


def _check_controlnets(request: GenerateRequest, model: ModelConfig, limits: LimitsConfig) -> None:
    check_controlnet_count(request, limits)
    known = {control.id for control in model.controlnets}
    for index, control in enumerate(request.controlnet):
        if control.id not in known:
            names = ", ".join(sorted(known)) or "none"
            raise InvalidRequestError(
                f"unknown ControlNet {control.id!r} for model {model.id!r}; its ControlNets: "
                f"{names}",
                code="unknown_controlnet",
                param=f"controlnet.{index}.id",
            )


def _first_set(name: str, *values: int | None) -> int:
    for value in values:
        if value is not None:
            return value
    raise InvalidRequestError(
        f"{name} is required for this model: neither its config nor its checkpoint gives a "
        "default size",
        code="missing_field",
        param=name,
    )


def check_remote_request(request: GenerateRequest, limits: LimitsConfig) -> None:
    """The limits that apply to a provider model too (its own API checks the rest)."""
    _check_range("n", request.n, 1, limits.max_n)
    images = request.image_fields
    local_only = {
        **{name: True for name in images},
        "noise_mask": request.noise_mask is not None,
        "loras": bool(request.loras),
        "refiner": request.refiner is not None,
    }
    param = next((name for name, used in local_only.items() if used), None)
    if param is not None:
        raise InvalidRequestError(
            f"{param} is not supported for provider models (image inputs, LoRAs and refiners run "
            "on local models only)",
            code="unsupported_for_provider",
            param=param,
        )
    if len(request.prompt) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"prompt is {len(request.prompt)} characters long; the limit is "
            f"{limits.max_prompt_chars}",
            code="prompt_too_long",
            param="prompt",
        )


def _check_size(request: GenerateRequest, limits: LimitsConfig) -> None:
    for name in ("width", "height"):
        value = getattr(request, name)
        if value % 8 or not limits.min_side <= value <= limits.max_side:
            raise InvalidRequestError(
                f"{name} must be a multiple of 8 between {limits.min_side} and "
                f"{limits.max_side}; got {value}",
                param=name,
            )
    pixels = (request.width or 0) * (request.height or 0)
    if pixels > limits.max_pixels:
        raise InvalidRequestError(
            f"width*height is {pixels} pixels; the limit is {limits.max_pixels}",
            code="too_many_pixels",
            param="width",
        )


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequestError(
            f"{name} must be between {low} and {high}; got {value}", param=name
        )

"""OpenAI's embeddings API on our CLIP encoders: `POST /v1/embeddings`'s request and response,
the edge checks, and the pure builder the Router answers with. Each input item is text, or an
image as a `data:image/...;base64,` URL; vectors go out as float lists, or as base64 of their
little-endian float32 bytes (what the `openai` SDK asks for by default and decodes). Torch-free.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.api.schemas import FieldConflict
from shared.config import LimitsConfig
from shared.errors import InvalidRequestError
from shared.intake.resolve import from_validation_error

EncodingFormat = Literal["float", "base64"]
MAX_INPUTS = 64
IMAGE_PREFIX = "data:image/"


def is_image_input(item: str) -> bool:
    """Whether an input item is an image (a `data:image/` URL) rather than text."""
    return item[: len(IMAGE_PREFIX)].lower() == IMAGE_PREFIX


class EmbeddingsRequest(BaseModel):
    """The body of `POST /v1/embeddings` (OpenAI's fields; token arrays are not taken)."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(
        description=f"Text, a `data:image/...;base64,` URL, or a list of up to {MAX_INPUTS} of "
        "them (each item starting with `data:image/` is an image)."
    )
    model: str = Field(min_length=1, max_length=200, description="Model id from /v1/models.")
    encoding_format: EncodingFormat = Field(
        default="float",
        description="`float` lists, or `base64` of the little-endian float32 bytes.",
    )
    dimensions: int | None = Field(
        default=None,
        ge=1,
        description="Must equal the model's dimension if given: CLIP embeddings are not trained "
        "to be truncated, so they are never shortened.",
    )
    user: str | None = Field(default=None, max_length=256, description="Accepted, not stored.")

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        ):
            return value
        raise FieldConflict(
            "",
            "input must be a string or a list of strings (text or data:image/ URLs); token "
            "arrays are not supported",
        )

    @property
    def inputs(self) -> list[str]:
        """The input items in order (a single string is a list of one)."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(
        description="The vector, or with `encoding_format: base64` its float32 bytes in base64."
    )


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """OpenAI's `CreateEmbeddingResponse`."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


def parse_embeddings_request(body: dict[str, Any], limits: LimitsConfig) -> EmbeddingsRequest:
    """The request, refused with our error if it breaks a rule or a limit."""
    try:
        request = EmbeddingsRequest.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc, EmbeddingsRequest) from None
    items = request.inputs
    if not items:
        raise InvalidRequestError("input must not be empty", code="empty_input", param="input")
    if len(items) > MAX_INPUTS:
        raise InvalidRequestError(
            f"input has {len(items)} items; the limit is {MAX_INPUTS} per request",
            code="too_many_inputs",
            param="input",
        )
    for index, item in enumerate(items):
        param = "input" if isinstance(request.input, str) else f"input.{index}"
        if not item:
            raise InvalidRequestError(
                f"{param} is an empty string", code="empty_input", param=param
            )
        if not is_image_input(item) and len(item) > limits.max_prompt_chars:
            raise InvalidRequestError(
                f"{param} is {len(item)} characters long; the limit is {limits.max_prompt_chars}",
                code="prompt_too_long",
                param=param,
            )
    return request


def embeddings_response(
    model: str, vectors: list[np.ndarray], encoding_format: EncodingFormat, prompt_tokens: int
) -> EmbeddingsResponse:
    """The answer for one vector per input item, in input order."""
    data = []
    for index, vector in enumerate(vectors):
        values = np.asarray(vector, dtype="<f4")
        if values.ndim != 1:
            raise ValueError(f"embedding {index} must be one vector; got shape {values.shape}")
        embedding: list[float] | str = (
            base64.b64encode(values.tobytes()).decode()
            if encoding_format == "base64"
            else values.tolist()
        )
        data.append(Embedding(index=index, embedding=embedding))
    usage = EmbeddingsUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return EmbeddingsResponse(data=data, model=model, usage=usage)


def check_dimensions(request: EmbeddingsRequest, response: EmbeddingsResponse) -> None:
    """Refuse a `dimensions` other than the model's (its vectors' length)."""
    if request.dimensions is None or not response.data:
        return
    first = response.data[0].embedding
    actual = len(first) if isinstance(first, list) else len(base64.b64decode(first)) // 4
    if request.dimensions != actual:
        raise InvalidRequestError(
            f"dimensions must be {actual}, the dimension of {request.model!r} (its embeddings "
            f"are not shortened), or left out; got {request.dimensions}",
            code="unsupported_dimensions",
            param="dimensions",
        )

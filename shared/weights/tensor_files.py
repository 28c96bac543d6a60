"""Checkpoint files parsed into `TensorBlob`s: tensors as raw bytes in numpy, without torch.

Safetensors are parsed here rather than with the safetensors package: the arrays stay zero-copy
views of the bytes read, bfloat16 survives without torch, and a truncated file is caught before it
becomes garbage weights. Pickle checkpoints are read with torch (imported only then), and the
loader reads them only when a model opts in. `DTYPES` is the element-type table that the module
builder uses to view the bytes as torch tensors.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> (bytes per element, torch dtype name); numpy never sees the element type.
DTYPES = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "I64": (8, "int64"),
    "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U64": (8, "uint64"),
    "U32": (4, "uint32"), "U16": (2, "uint16"), "U8": (1, "uint8"), "BOOL": (1, "bool"),
}  # fmt: skip
_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


@dataclass(repr=False)
class TensorBlob:
    """One tensor as raw bytes: numpy has no bfloat16, so the element type travels as a string."""

    data: np.ndarray  # 1-D uint8, usually a view into the file's bytes or the object store
    dtype: str  # safetensors dtype: "F32", "F16", "BF16", "I64", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __repr__(self) -> str:
        return f"TensorBlob({self.dtype}, {self.shape})"


def parse_safetensors(data: bytes, name: str) -> dict[str, TensorBlob]:
    """Split a safetensors file's bytes into zero-copy `TensorBlob` views.

    Layout: 8-byte little-endian header length, a JSON header of {name: {dtype, shape,
    data_offsets}}, then the data the offsets point into.
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    header, start = _header(buffer, name)
    header.pop("__metadata__", None)
    body = buffer[start:]
    needed = max((_offsets(info, name)[1] for info in header.values()), default=0)
    if body.size < needed:
        raise _truncated(name, start + needed, buffer.size)
    return {key: _blob(body, key, info, name) for key, info in header.items()}


def safetensors_metadata(data: bytes, name: str) -> dict[str, str]:
    """The free-form `__metadata__` of a safetensors file's header (string to string), e.g. the
    LoRA config diffusers saves under `lora_adapter_metadata`; {} when it has none."""
    header, _ = _header(np.frombuffer(data, dtype=np.uint8), name)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{name} has a malformed header", code="corrupt_file")
    return {str(k): str(v) for k, v in metadata.items()}


def _header(buffer: np.ndarray, name: str) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and where the data starts."""
    if buffer.size < 8:
        raise _truncated(name, 8, buffer.size)
    (header_len,) = struct.unpack("<Q", buffer[:8].tobytes())
    if header_len > _MAX_HEADER_BYTES:
        raise ModelLoadError(f"{name} is not a safetensors file", code="corrupt_file")
    start = 8 + header_len
    if buffer.size < start:
        raise _truncated(name, start, buffer.size)
    try:
        header = json.loads(buffer[8:start].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelLoadError(f"{name} is not a safetensors file", code="corrupt_file") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{name} is not a safetensors file", code="corrupt_file")
    return header, start


def _offsets(info: Any, name: str) -> tuple[int, int]:
    try:
        begin, end = (int(x) for x in info["data_offsets"])
    except (TypeError, KeyError, ValueError):
        raise ModelLoadError(f"{name} has a malformed header", code="corrupt_file") from None
    return begin, end


def _blob(body: np.ndarray, key: str, info: dict[str, Any], name: str) -> TensorBlob:
    begin, end = _offsets(info, name)
    dtype, shape = info.get("dtype"), tuple(int(d) for d in info.get("shape", ()))
    if dtype not in DTYPES:
        raise ModelLoadError(
            f"{name}: tensor {key} has unsupported dtype {dtype}", code="corrupt_file"
        )
    if end - begin != math.prod(shape) * DTYPES[dtype][0] or begin < 0:
        raise ModelLoadError(
            f"{name}: tensor {key} ({dtype}, shape {list(shape)}) has {end - begin} bytes",
            code="corrupt_file",
        )
    return TensorBlob(data=body[begin:end], dtype=dtype, shape=shape)


def _truncated(name: str, needed: int, size: int) -> ModelLoadError:
    return ModelLoadError(
        f"{name} is truncated: its header needs {needed} bytes but the file has {size}; "
        "re-download or re-upload it",
        code="truncated",
    )


def load_pickle(data: bytes, name: str) -> Any:
    """A pickle checkpoint's object, through torch.load(weights_only=True) (no code runs)."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{name} could not be loaded with torch.load(weights_only=True): {exc}",
            code="corrupt_file",
        ) from None


def parse_pickle(data: bytes, name: str) -> dict[str, TensorBlob]:
    import torch

    state = load_pickle(data, name)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style .ckpt
    if not isinstance(state, dict):
        raise ModelLoadError(f"{name} does not hold a state dict", code="corrupt_file")
    return {k: _blob_from_tensor(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _blob_from_tensor(tensor: torch.Tensor) -> TensorBlob:
    import torch

    names = {torch_name: st for st, (_, torch_name) in DTYPES.items()}
    tensor = tensor.detach().contiguous()
    raw = tensor.reshape(-1).view(dtype=torch.uint8)
    return TensorBlob(
        data=raw.numpy(),
        dtype=names[str(tensor.dtype).removeprefix("torch.")],
        shape=tuple(tensor.shape),
    )

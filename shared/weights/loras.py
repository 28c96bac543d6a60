"""A model's LoRAs as components: `lora:<id>` per `ModelConfig.loras` entry.

Each component holds one safetensors file's tensors under their keys exactly as in the file,
and a config of {"source", "weight_name", "format", "metadata"}: the format its keys are in
(`LoraFormat`: diffusers/PEFT `unet.….lora_A.weight`, or kohya/A1111
`lora_unet_….lora_down.weight` with `.alpha`), and the file's safetensors `__metadata__` (where
diffusers keeps a PEFT LoRA's rank and alpha). Replicas turn the tensors into adapters with
diffusers' own converters (`shared.engine.loras`).

A source is a .safetensors file (local path or URL), a folder or Hub repo with `weight_name` (or
the only .safetensors there; a Hub download fetches only that file) or a built-in LoRA. Only
safetensors are read, whatever `allow_pickle` says. Only UNet LoRAs are served: the text
encoders run in another deployment (ClipEncoder), so a LoRA with text-encoder keys is refused
rather than half applied. A LoRA's file is checked against, and its digest kept under, the
`sha256:` key `lora:<id>/<weight_name>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Literal

from shared.config import LoraConfig, ModelConfig
from shared.errors import ModelLoadError
from shared.weights.components import ComponentWeights
from shared.weights.sources import (
    PICKLE_SUFFIXES,
    SourceReader,
    open_source,
    options_for,
)
from shared.weights.tensor_files import TensorBlob, parse_safetensors, safetensors_metadata

LoraFormat = Literal["diffusers", "kohya"]
LORA_LIBRARY, LORA_CLASS = "peft", "LoRA"

_SAFETENSORS = ".safetensors"
# A key is a LoRA's when it names one of these parameters of a module: PEFT's lora_A/lora_B (and
# DoRA's magnitude), diffusers' older `lora.down`/`_lora.down`, kohya's lora_down/lora_up.
_DIFFUSERS_PARAM = re.compile(
    r"(\.(lora_[AB]|lora_magnitude_vector)(\.(weight|bias))?"
    r"|[._]lora\.(down|up)\.weight|\.alpha)$"
)
_KOHYA_PARAM = re.compile(r"\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
# (format, part) by key prefix; "text" parts are refused.
_PREFIXES: dict[str, tuple[LoraFormat, str]] = {
    "unet.": ("diffusers", "unet"),
    "text_encoder.": ("diffusers", "text"),
    "text_encoder_2.": ("diffusers", "text"),
    "lora_unet_": ("kohya", "unet"),
    "lora_te_": ("kohya", "text"),
    "lora_te1_": ("kohya", "text"),
    "lora_te2_": ("kohya", "text"),
}


def load_loras(config: ModelConfig) -> dict[str, ComponentWeights]:
    """Every LoRA of `config` as a `lora:<id>` component; any that fails fails the model."""
    return {lora.component: load_lora(config, lora) for lora in config.loras}


def load_lora(config: ModelConfig, lora: LoraConfig) -> ComponentWeights:
    """One LoRA's file, read once (and hashed as it is read); errors name the LoRA."""
    try:
        source, weight_name = _split_source(lora)
        if weight_name is not None:
            _refuse_unless_safetensors(weight_name)
        fs, root = open_source(
            source,
            options_for(source, config.source, config.storage_options),
            allow_patterns=lora_hub_patterns(weight_name),
        )
        reader = SourceReader(fs, root, config.sha256, f"{lora.component}/")
        weight_name = weight_name or _only_safetensors(reader)
        data = reader.read(weight_name)
        url = reader.url(weight_name)
        tensors = parse_safetensors(data, url)
        lora_format = detect_format(tensors, url)
        metadata = safetensors_metadata(data, url)
        reader.check_all_verified("")
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"LoRA {lora.id!r} of model {config.id!r}: {exc.message}", code=exc.code
        ) from None
    lora_config = {
        "source": lora.source,
        "weight_name": weight_name,
        "format": lora_format,
        "metadata": metadata,
    }
    return ComponentWeights(
        lora.component,
        LORA_LIBRARY,
        LORA_CLASS,
        lora_config,
        tensors,
        files_sha256=reader.take_digests(),
    )


def lora_hub_patterns(weight_name: str | None) -> list[str]:
    """What a Hub download of a LoRA repo fetches: the named file, else its safetensors."""
    return [weight_name] if weight_name else [f"*{_SAFETENSORS}"]


def _split_source(lora: LoraConfig) -> tuple[str, str | None]:
    """(source to open, file in it): a source naming a file is opened at its folder."""
    weight_name = lora.weight_name.strip("/") if lora.weight_name else None
    if not lora.source.endswith((_SAFETENSORS, *PICKLE_SUFFIXES)):
        return lora.source, weight_name
    if weight_name is not None:
        raise ModelLoadError(
            f"source {lora.source} names a file, so `weight_name` ({weight_name}) must be unset",
            code="invalid_lora_source",
        )
    _refuse_unless_safetensors(lora.source)
    if "://" in lora.source:
        folder, _, name = lora.source.rstrip("/").rpartition("/")
        return folder, name
    path = Path(lora.source).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"LoRA file {path} not found", code="missing_file")
    return str(path.parent), path.name


def _refuse_unless_safetensors(name: str) -> None:
    """Before any download: pickle files can run arbitrary code when loaded, and a LoRA is a
    file users pick up from anywhere, so `allow_pickle` does not extend to LoRAs."""
    if name.endswith(_SAFETENSORS):
        return
    why = (
        "a pickle file, which can run arbitrary code when loaded"
        if name.endswith(PICKLE_SUFFIXES)
        else "not a .safetensors file"
    )
    raise ModelLoadError(
        f"{PurePosixPath(name).name} is {why}; LoRAs are read from .safetensors only "
        "(`allow_pickle` does not apply to them): convert it, or use the LoRA's .safetensors file",
        code="lora_not_safetensors",
    )


def _only_safetensors(reader: SourceReader) -> str:
    files = sorted(reader.list_files(""))
    found = [f for f in files if f.endswith(_SAFETENSORS)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ModelLoadError(
            f"{reader.url('')} holds several .safetensors files ({', '.join(found)}); set "
            "`weight_name` to the LoRA's",
            code="lora_ambiguous",
        )
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        _refuse_unless_safetensors(pickles[0])
    raise ModelLoadError(f"no .safetensors file in {reader.url('')}", code="missing_file")


def detect_format(tensors: Mapping[str, TensorBlob], name: str) -> LoraFormat:
    """The key format of a LoRA file's tensors; refuses text-encoder LoRAs and unknown keys."""
    parts = {key: _classify(key) for key in tensors}
    unknown = [key for key, part in parts.items() if part is None]
    formats = {part[0] for part in parts.values() if part is not None}
    if not tensors or unknown or len(formats) > 1:
        raise ModelLoadError(_unrecognised(name, unknown, formats), code="lora_unrecognised")
    text = [key for key, part in parts.items() if part is not None and part[1] == "text"]
    if text:
        raise ModelLoadError(
            f"{name}: {len(text)} of its {len(tensors)} tensors target the text encoders (e.g. "
            f"{text[0]}); only UNet LoRAs are served, since the text encoders run in another "
            "deployment (ClipEncoder): use a UNet-only version of the LoRA",
            code="lora_text_encoder_unsupported",
        )
    (lora_format,) = formats
    return lora_format


def _classify(key: str) -> tuple[LoraFormat, str] | None:
    for prefix, (lora_format, part) in _PREFIXES.items():
        if key.startswith(prefix):
            param = _DIFFUSERS_PARAM if lora_format == "diffusers" else _KOHYA_PARAM
            return (lora_format, part) if param.search(key) else None
    return None


def _unrecognised(name: str, unknown: Iterable[str], formats: set[LoraFormat]) -> str:
    expected = (
        "expected diffusers/PEFT keys (unet.<module>.lora_A.weight, .lora_B.weight) or "
        "kohya/A1111 keys (lora_unet_<module>.lora_down.weight, .lora_up.weight, .alpha)"
    )
    examples = list(unknown)[:3]
    if examples:
        return f"{name} is not a LoRA in a supported format: {expected}; got {', '.join(examples)}"
    if len(formats) > 1:
        return f"{name} mixes diffusers and kohya keys; {expected}"
    return f"{name} holds no tensors; {expected}"

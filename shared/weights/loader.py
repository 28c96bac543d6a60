"""Model weights as plain picklable containers, loaded from a model source.

This module owns the road from a model source to `ModelWeights`: one `ComponentWeights` per
pipeline component, holding its config, its tensors as raw bytes in numpy (`TensorBlob`) and small
side files (tokenizers, image processors). It reads the diffusers layout (model_index.json, a
folder per component, the variant's weight files or the full ones, sharded or not) plus optional
extra components such as the preview decoder, a VAE that replaces the checkpoint's, the
model's ControlNets (`controlnet:<id>`, each a diffusers ControlNetModel folder: a subfolder of the
source or a source of its own, required once configured) and a configured IP-Adapter (its CLIP
vision encoder and its weights file), and refuses pickle weights unless a model opts in. Every
component keeps the sha256 of each file read for it (a ControlNet from another source under
`controlnet:<id>/...`). `load_suite` is everything a model configures, its LoRAs included
(`shared.weights.loras`); ModelCache `ray.put`s each component as is. The containers themselves
live in `shared.weights.components`.

Opening sources and reading files with checksums live in `shared.weights.sources`, parsing
checkpoint files in `shared.weights.tensor_files`, and building torch modules, tokenizers and
scheduler configs back from the weights (on replicas) in `shared.engine.modules`. torch is
imported only to read pickle checkpoints, so the cache side stays light.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import fsspec

from shared.config import ModelConfig
from shared.errors import ModelLoadError
from shared.weights.components import ComponentWeights, ModelWeights
from shared.weights.loras import load_loras
from shared.weights.sources import (
    PICKLE_STEMS,
    PICKLE_SUFFIXES,
    SourceReader,
    hub_patterns,
    open_source,
    options_for,
)
from shared.weights.tensor_files import TensorBlob, load_pickle, parse_pickle, parse_safetensors

logger = logging.getLogger(__name__)

SDXL_COMPONENTS = (
    "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
)  # fmt: skip
# What each model-owning deployment fetches from the cache; taesd, ip_adapter and image_encoder
# only when the model has them (`fetch_components` skips names a model lacks).
ENGINE_COMPONENTS = (
    "unet", "vae", "scheduler", "taesd", "ip_adapter", "refiner_unet", "refiner_scheduler",
)  # fmt: skip
TEXT_COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "image_encoder")
# An IP-Adapter's files are checked against `sha256` keys under this prefix, as if the adapter's
# source were a subfolder of the model's: "ip_adapter/sdxl_models/ip-adapter_sdxl.safetensors".
IP_ADAPTER_KEY_PREFIX = "ip_adapter/"
# A refiner's components and the folders of its checkpoint they come from; `refiner` itself is
# its model_index.json (how it encodes an empty negative), which ClipEncoder reads.
REFINER_FOLDERS = {"refiner_unet": "unet", "refiner_scheduler": "scheduler"}
REFINER_INDEX = "refiner"
REFINER_KEY_PREFIX = "refiner/"

_SAFETENSORS_STEMS = ("diffusion_pytorch_model", "model")
# Small files a weights component keeps besides its config: a vision encoder's image processor.
_SIDE_FILES = ("preprocessor_config.json",)
# Codes meaning "there is nothing there": an optional extra component with one of these is absent.
_MISSING_CODES = frozenset({"model_not_found", "missing_file"})


# ------------------------------------------------------------------------------------ components


def load_model(
    config: ModelConfig,
    components: Sequence[str] = SDXL_COMPONENTS,
    extra: Mapping[str, str | None] | None = None,
    overrides: Mapping[str, str | None] | None = None,
) -> ModelWeights:
    """Read `components` of `config.source` (diffusers layout), plus optional `extra` ones.

    `extra` maps a component name to a subfolder of the source or to another source (the preview
    decoder: {"taesd": config.preview_decoder}); an extra that does not exist is left out.
    `overrides` does the same for components read instead of the checkpoint's own folder (a VAE:
    {"vae": config.vae}) or besides them (a ControlNet), which must exist. Components that
    model_index.json declares empty (null) are left out.
    """
    extras = {name: value for name, value in (extra or {}).items() if value}
    replaced = {name: value for name, value in (overrides or {}).items() if value}
    own = [name for name in components if name not in replaced]
    elsewhere = [*extras.values(), *replaced.values()]
    folders = [*own, *(v for v in elsewhere if "://" not in v)]
    patterns = hub_patterns(folders, config.variant, config.allow_pickle)
    fs, root = open_source(config.source, config.storage_options, allow_patterns=patterns)
    index = _read_index(SourceReader(fs, root, config.sha256), config.source)
    loaded: dict[str, ComponentWeights] = {}
    for name in components:
        if name in replaced:
            loaded[name] = _load_override(fs, root, name, replaced[name], config)
            continue
        library, class_name = _index_entry(index, name, config.source)
        if class_name is not None:
            loaded[name] = load_component(fs, root, name, config, library, class_name)
    for name, value in replaced.items():
        if name not in components:  # an added component that must exist (a ControlNet)
            loaded[name] = _load_override(fs, root, name, value, config)
    for name, value in extras.items():
        component = _load_extra(fs, root, name, value, config)
        if component is not None:
            loaded[name] = component
    return ModelWeights(source=config.source, components=loaded)


def _read_index(reader: SourceReader, source: str) -> dict[str, Any]:
    try:
        return reader.read_json("model_index.json")
    except ModelLoadError as exc:
        if exc.code != "missing_file":
            raise
        raise ModelLoadError(
            f"{source} is not a diffusers model folder: {exc.message}", code="model_not_found"
        ) from None


def _index_entry(index: dict[str, Any], name: str, source: str) -> tuple[str | None, str | None]:
    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2:
        declared = sorted(k for k, v in index.items() if isinstance(v, list) and v[-1])
        raise ModelLoadError(
            f"model_index.json of {source} has no component {name!r}; it has: "
            f"{', '.join(declared)}",
            code="missing_file",
        )
    return entry[0], entry[1]


def _load_extra(
    fs: fsspec.AbstractFileSystem, root: str, name: str, value: str, config: ModelConfig
) -> ComponentWeights | None:
    """`_load_elsewhere`, or None (logged) when there is nothing there."""
    try:
        return _load_elsewhere(fs, root, name, value, config)
    except ModelLoadError as exc:
        if exc.code not in _MISSING_CODES:
            raise
        logger.warning("optional component %s of %s left out: %s", name, config.id, exc.message)
        return None


def _load_override(
    fs: fsspec.AbstractFileSystem, root: str, name: str, value: str, config: ModelConfig
) -> ComponentWeights:
    """`_load_elsewhere` for a component configured to replace the checkpoint's: required."""
    try:
        return _load_elsewhere(fs, root, name, value, config)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"{name} of model {config.id!r} is {value!r} (a subfolder of {config.source} or "
            f"another source), which could not be loaded: {exc.message}",
            code=exc.code,
        ) from None


def _load_elsewhere(
    fs: fsspec.AbstractFileSystem, root: str, name: str, value: str, config: ModelConfig
) -> ComponentWeights:
    """A subfolder of the source if one is named `value`, else `value` as a source of its own
    (checked under `name/...`, as if it were that subfolder)."""
    local = "://" not in value and not value.startswith("/")
    if local and SourceReader(fs, root, {}).is_folder(value):
        return load_component(fs, root, name, config, subfolder=value)
    other_fs, other_root = open_source(
        value,
        options_for(value, config.source, config.storage_options),
        allow_patterns=[
            *hub_patterns([""], config.variant, config.allow_pickle),
            *hub_patterns([""], None, config.allow_pickle),
        ],
    )
    return load_component(other_fs, other_root, name, config, subfolder="", key_prefix=f"{name}/")


def load_component(
    fs: fsspec.AbstractFileSystem,
    root: str,
    name: str,
    config: ModelConfig,
    library: str | None = None,
    class_name: str | None = None,
    *,
    subfolder: str | None = None,
    key_prefix: str = "",
    reader: SourceReader | None = None,
) -> ComponentWeights:
    """Read one component from `root/subfolder` (default subfolder: `name`; "" is the root).

    Library and class default to what the component's own config or tokenizer config says.
    A `reader` given is used (and keeps what it verified), else one over `root` is made. The
    component keeps the digests of the files read for it since the reader's last `take_digests`.
    """
    folder = name if subfolder is None else subfolder
    reader = reader or SourceReader(fs, root, config.sha256, key_prefix)
    files = reader.list_files(folder)
    kind = _component_kind(class_name, files)
    if kind == "scheduler":
        scheduler = reader.read_json(_join(folder, "scheduler_config.json"))
        component = ComponentWeights(
            name, library or "diffusers", class_name or scheduler.get("_class_name", ""), scheduler
        )
    elif kind == "tokenizer":
        contents = {f: reader.read(_join(folder, f)) for f in sorted(files)}
        class_name = class_name or _tokenizer_class(contents)
        component = ComponentWeights(
            name, library or "transformers", class_name, {}, files=contents
        )
    else:
        component = _load_weights(reader, name, folder, files, config, library, class_name)
    reader.check_all_verified(folder)
    component.files_sha256 = reader.take_digests()
    return component


def _tokenizer_class(files: dict[str, bytes]) -> str:
    try:
        return json.loads(files["tokenizer_config.json"])["tokenizer_class"]
    except (KeyError, TypeError, ValueError):
        return "AutoTokenizer"  # let transformers work it out from the files


def _component_kind(class_name: str | None, files: set[str]) -> str:
    if (class_name or "").endswith("Scheduler") or "scheduler_config.json" in files:
        return "scheduler"
    if "Tokenizer" in (class_name or "") or ("config.json" not in files and files & {
        "tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model"
    }):  # fmt: skip
        return "tokenizer"
    return "weights"


def _load_weights(
    reader: SourceReader,
    name: str,
    folder: str,
    files: set[str],
    config: ModelConfig,
    library: str | None,
    class_name: str | None,
) -> ComponentWeights:
    if "config.json" not in files:
        raise ModelLoadError(
            f"{reader.url(_join(folder, 'config.json'))} not found", code="missing_file"
        )
    model_config = reader.read_json(_join(folder, "config.json"))
    library = library or ("diffusers" if "_class_name" in model_config else "transformers")
    class_name = (
        class_name or model_config.get("_class_name") or model_config.get("architectures", [""])[0]
    )
    tensors = _read_tensors(reader, folder, files, config)
    side = {f: reader.read(_join(folder, f)) for f in _SIDE_FILES if f in files}
    return ComponentWeights(name, library, class_name, model_config, tensors, side)


def _read_tensors(
    reader: SourceReader, folder: str, files: set[str], config: ModelConfig
) -> dict[str, TensorBlob]:
    parse = parse_safetensors
    found = _pick_weights(files, config.variant, (".safetensors",), _SAFETENSORS_STEMS)
    if found is None:
        _refuse_or_explain(reader, folder, files, config)
        parse = parse_pickle
        found = _pick_weights(files, config.variant, PICKLE_SUFFIXES, PICKLE_STEMS)
    if found is None:
        raise ModelLoadError(
            f"{reader.url(folder)} has several pickle files and none with a standard name",
            code="missing_file",
        )
    filename, sharded = found
    if sharded:
        return _read_shards(reader, folder, filename, parse)
    rel = _join(folder, filename)
    return parse(reader.read(rel), reader.url(rel))


def _refuse_or_explain(
    reader: SourceReader, folder: str, files: set[str], config: ModelConfig
) -> None:
    """Called when a folder has no safetensors: say why loading cannot go on, unless it may."""
    if not any(f.endswith(PICKLE_SUFFIXES) for f in files):
        infix = f"[.{config.variant}]" if config.variant else ""
        raise ModelLoadError(
            f"no weights in {reader.url(folder)}: expected diffusion_pytorch_model{infix}"
            f".safetensors or model{infix}.safetensors (or a sharded index)",
            code="missing_file",
        )
    if not config.allow_pickle:
        raise ModelLoadError(
            f"{reader.url(folder)} has only pickle weights (.bin/.pt/.ckpt), which can run code "
            "when loaded; convert them to safetensors or set `allow_pickle: true` for this model",
            code="pickle_refused",
        )


def _read_shards(
    reader: SourceReader,
    folder: str,
    index_name: str,
    parse: Callable[[bytes, str], dict[str, TensorBlob]],
) -> dict[str, TensorBlob]:
    weight_map = reader.read_json(_join(folder, index_name)).get("weight_map") or {}
    tensors: dict[str, TensorBlob] = {}
    for shard in sorted(set(weight_map.values())):
        rel = _join(folder, shard)
        tensors.update(parse(reader.read(rel), reader.url(rel)))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ModelLoadError(
            f"{reader.url(_join(folder, index_name))} maps {len(missing)} tensors to shards that "
            f"do not hold them, e.g. {', '.join(missing[:3])}",
            code="missing_file",
        )
    return tensors


def _pick_weights(
    files: set[str], variant: str | None, suffixes: Sequence[str], stems: Sequence[str]
) -> tuple[str, bool] | None:
    """(file name, is a shard index) of the weights to read: the variant's if present, else the
    full-precision ones, else a folder's only weight file (e.g. a lone `taesdxl.safetensors`).
    """
    for wanted in dict.fromkeys((variant, None)):
        for stem in stems:
            for suffix in suffixes:
                if _add_variant(f"{stem}{suffix}", wanted) in files:
                    return _add_variant(f"{stem}{suffix}", wanted), False
                if _add_variant(f"{stem}{suffix}.index.json", wanted) in files:
                    return _add_variant(f"{stem}{suffix}.index.json", wanted), True
    lone = [f for f in files if f.endswith(tuple(suffixes))]
    return (lone[0], False) if len(lone) == 1 else None


def _add_variant(filename: str, variant: str | None) -> str:
    """diffusers' and transformers' naming: model.safetensors -> model.fp16.safetensors,
    model.safetensors.index.json -> model.safetensors.index.fp16.json."""
    if not variant:
        return filename
    head, _, suffix = filename.rpartition(".")
    return f"{head}.{variant}.{suffix}"


def _join(folder: str, filename: str) -> str:
    return f"{folder}/{filename}" if folder else filename


# ------------------------------------------------------------------------------------ IP-Adapter


def load_suite(config: ModelConfig) -> ModelWeights:
    """Everything `config` names: its SDXL components (with its VAE, if it names one), its
    preview decoder (left out if absent), its IP-Adapter, refiner, ControlNets and LoRAs (all
    required once configured; LoRAs as `lora:<id>` components, see `shared.weights.loras`,
    ControlNets as `controlnet:<id>`)."""
    controlnets = {net.component: net.source for net in config.controlnets}
    weights = load_model(
        config,
        extra={"taesd": config.preview_decoder},
        overrides={"vae": config.vae, **controlnets},
    )
    weights.components.update(load_ip_adapter(config))
    weights.components.update(load_refiner(config))
    weights.components.update(load_loras(config))
    return weights


def load_ip_adapter(config: ModelConfig) -> dict[str, ComponentWeights]:
    """The model's IP-Adapter as two components, or {} when it has none.

    `image_encoder` is the CLIPVisionModelWithProjection folder (its preprocessor_config.json
    kept when present) and `ip_adapter` the adapter's one weights file, with diffusers' key names
    (`image_proj.*`, `ip_adapter.{id}.to_k_ip.weight`, ...). Unlike the preview decoder, a
    configured adapter is not optional: any missing file fails the model's load, naming it.
    Checksums are looked up under `ip_adapter/` (see `IP_ADAPTER_KEY_PREFIX`).
    """
    adapter = config.ip_adapter
    if adapter is None:
        return {}
    weight_name, encoder = adapter.weight_name.strip("/"), adapter.image_encoder.strip("/")
    try:
        parse = _adapter_parser(weight_name, config)
        fs, root = open_source(
            adapter.source,
            options_for(adapter.source, config.source, config.storage_options),
            allow_patterns=ip_adapter_hub_patterns(config),
        )
        reader = SourceReader(fs, root, config.sha256, IP_ADAPTER_KEY_PREFIX)
        image_encoder = load_component(
            fs, root, "image_encoder", config, subfolder=encoder, reader=reader
        )
        tensors = parse(reader.read(weight_name), reader.url(weight_name))
        _check_adapter_keys(tensors, reader.url(weight_name))
        reader.check_all_verified("")
        digests = reader.take_digests()
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"IP-Adapter of model {config.id!r}: {exc.message}", code=exc.code
        ) from None
    weights = ComponentWeights(
        "ip_adapter",
        "diffusers",
        "IPAdapter",
        {"source": adapter.source, "weight_name": weight_name},
        tensors,
        files_sha256=digests,
    )
    return {"image_encoder": image_encoder, "ip_adapter": weights}


def ip_adapter_hub_patterns(config: ModelConfig) -> list[str]:
    """What a Hub download of the adapter's repo fetches: its weights file and the image
    encoder's configs and weights (the variant's, or the full ones), nothing else of a repo that
    holds many adapters."""
    adapter = config.ip_adapter
    if adapter is None:
        return []
    encoder = [adapter.image_encoder.strip("/")]
    patterns = [
        adapter.weight_name.strip("/"),
        *hub_patterns(encoder, config.variant, config.allow_pickle),
        *hub_patterns(encoder, None, config.allow_pickle),
    ]
    return list(dict.fromkeys(patterns))


def _adapter_parser(weight_name: str, config: ModelConfig) -> Callable[[bytes, str], Any]:
    """How to read the adapter's weights file; refuses pickle files unless the model allows them
    (before anything is downloaded)."""
    if weight_name.endswith(".safetensors"):
        return parse_safetensors
    if not weight_name.endswith(PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"{weight_name} is neither a .safetensors nor a pickle (.bin) weights file",
            code="unsupported_model",
        )
    if not config.allow_pickle:
        raise ModelLoadError(
            f"{weight_name} is a pickle file, which can run code when loaded; use the "
            "adapter's .safetensors file or set `allow_pickle: true` for this model",
            code="pickle_refused",
        )
    return _parse_adapter_pickle


def _parse_adapter_pickle(data: bytes, name: str) -> dict[str, TensorBlob]:
    """h94's .bin adapters nest their state dict ({"image_proj": {...}, "ip_adapter": {...}}),
    which `parse_pickle` (flat state dicts) would read as empty: flatten it to the .safetensors
    key names, then parse it as one (a copy, for an opt-in format only)."""
    import torch
    from safetensors.torch import save

    state = load_pickle(data, name)
    if not isinstance(state, dict):
        raise ModelLoadError(f"{name} does not hold a state dict", code="corrupt_file")
    flat = {
        f"{group}.{key}": tensor.contiguous()
        for group, part in state.items()
        if isinstance(part, dict)
        for key, tensor in part.items()
        if isinstance(tensor, torch.Tensor)
    }
    return parse_safetensors(save(flat), name)


def _check_adapter_keys(tensors: Mapping[str, TensorBlob], url: str) -> None:
    for group in ("image_proj", "ip_adapter"):
        if not any(key.startswith(f"{group}.") for key in tensors):
            raise ModelLoadError(
                f"{url} has no {group}.* tensors; is it an IP-Adapter's weights file?",
                code="weights_mismatch",
            )


# ------------------------------------------------------------------------------------ refiner


def load_refiner(config: ModelConfig) -> dict[str, ComponentWeights]:
    """The model's refiner as three components, or {} when it has none: `refiner_unet` and
    `refiner_scheduler` from the refiner checkpoint's own folders, and `refiner` (its
    model_index.json, which says how it encodes an empty negative prompt). Required once
    configured; checksums are looked up under `refiner/`. Its VAE and text encoder are not read:
    the base's serve it, as in diffusers' ensemble example (SDXL's refiner ships the same ones).
    """
    refiner = config.refiner
    if refiner is None:
        return {}
    try:
        fs, root = open_source(
            refiner.source,
            options_for(refiner.source, config.source, config.storage_options),
            allow_patterns=hub_patterns(
                list(REFINER_FOLDERS.values()), config.variant, config.allow_pickle
            ),
        )
        reader = SourceReader(fs, root, config.sha256, REFINER_KEY_PREFIX)
        index = _read_index(reader, refiner.source)
        loaded = {
            REFINER_INDEX: ComponentWeights(
                REFINER_INDEX,
                "diffusers",
                str(index.get("_class_name", "")),
                index,
                files_sha256=reader.take_digests(),
            )
        }
        for name, folder in REFINER_FOLDERS.items():
            library, class_name = _index_entry(index, folder, refiner.source)
            loaded[name] = load_component(
                fs, root, name, config, library, class_name, subfolder=folder, reader=reader
            )
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"refiner {refiner.id!r} of model {config.id!r}: {exc.message}", code=exc.code
        ) from None
    return loaded

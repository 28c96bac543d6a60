"""Model weights as plain picklable containers, and the torch modules built back from them.

This module owns the road from a model *source* — the built-in `tiny`/`small`, a local folder,
`s3://bucket/prefix` through s3fs, or a Hugging Face repo id — to `ModelWeights`: one
`ComponentWeights` per pipeline component, holding its config, its tensors as raw bytes in numpy
(`TensorBlob`) and small side files (tokenizers). ModelCache `ray.put`s each component as is;
replicas call `build_module`, `build_tokenizer` and `build_scheduler_config` to get working
objects back without copying weights on CPU.

Safetensors are parsed here rather than with the safetensors package: the arrays stay zero-copy
views of the bytes read, bfloat16 survives without torch, and a truncated file is caught before it
becomes garbage weights. Pickle checkpoints load only when a model opts in. torch, diffusers and
transformers are imported inside the build functions, so the cache side stays light.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from shared.config import ModelConfig
from shared.errors import ModelLoadError
from shared.tiny import BUILTIN_PRESETS, resolve_builtin

if TYPE_CHECKING:
    import torch
    import transformers

logger = logging.getLogger(__name__)

SDXL_COMPONENTS = (
    "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
)  # fmt: skip

# safetensors dtype -> (bytes per element, torch dtype name); numpy never sees the element type.
_DTYPES = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "I64": (8, "int64"),
    "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U64": (8, "uint64"),
    "U32": (4, "uint32"), "U16": (2, "uint16"), "U8": (1, "uint8"), "BOOL": (1, "bool"),
}  # fmt: skip
_SAFETENSORS_STEMS = ("diffusion_pytorch_model", "model")
_PICKLE_STEMS = ("diffusion_pytorch_model", "pytorch_model", "model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
# Codes meaning "there is nothing there": an optional extra component with one of these is absent.
_MISSING_CODES = frozenset({"model_not_found", "missing_file"})
# botocore waits 60 s to connect and retries for minutes by default; a wrong endpoint should fail
# a model load in seconds. Users override any of these through storage_options.
_S3_DEFAULTS: dict[str, Any] = {
    "use_listings_cache": False,  # a reload after fixing a bucket must see the fix
    "config_kwargs": {
        "connect_timeout": 10,
        "read_timeout": 60,
        "retries": {"max_attempts": 3, "mode": "standard"},
    },
}
_HUB_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


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


@dataclass(repr=False)
class ComponentWeights:
    """Everything needed to rebuild one pipeline component, and nothing that needs torch."""

    name: str
    library: str  # "diffusers" | "transformers"
    class_name: str
    config: dict[str, Any]
    tensors: dict[str, TensorBlob] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values()) + sum(map(len, self.files.values()))

    def __repr__(self) -> str:
        return (
            f"ComponentWeights({self.name}: {self.library}.{self.class_name}, "
            f"{len(self.tensors)} tensors, {len(self.files)} files, {self.nbytes} bytes)"
        )


@dataclass(repr=False)
class ModelWeights:
    source: str
    components: dict[str, ComponentWeights]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.components.values())

    def __repr__(self) -> str:
        return f"ModelWeights({self.source}: {', '.join(self.components)}; {self.nbytes} bytes)"


# ---------------------------------------------------------------------------------------- sources


def open_source(
    source: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    allow_patterns: Sequence[str] | None = None,
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root folder of `source`; Hub repos are downloaded first.

    `allow_patterns` limits what a Hub download fetches (default: configs, tokenizer files and
    safetensors in subfolders, so a repo's single-file checkpoint is not fetched as well).
    """
    options = dict(storage_options or {})
    if source in BUILTIN_PRESETS:
        return LocalFileSystem(), str(resolve_builtin(source))
    if source.startswith("s3://"):
        return _open_s3(source, options)
    if source.startswith("file://"):
        return _open_local(source.removeprefix("file://"))
    if "://" in source:
        return _open_url(source, options)
    if Path(source).expanduser().exists() or source.startswith(("/", ".", "~")):
        return _open_local(source)
    if not _HUB_REPO_ID.match(source):
        raise ModelLoadError(
            f"model source {source!r} is not a built-in name ({', '.join(BUILTIN_PRESETS)}), an "
            "existing folder, an s3:// URL or a Hugging Face repo id (org/name)",
            code="model_not_found",
        )
    return _open_hub(source, options, allow_patterns)


def _open_local(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist", code="model_not_found")
    return LocalFileSystem(), str(folder)


def _open_s3(source: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    import s3fs

    config_kwargs = {**_S3_DEFAULTS["config_kwargs"], **options.get("config_kwargs", {})}
    merged = {**_S3_DEFAULTS, **options, "config_kwargs": config_kwargs}
    try:
        fs = s3fs.S3FileSystem(**merged)
    except (TypeError, ValueError, KeyError) as exc:
        # The option *names* are safe to echo; their values may be credentials, so never those.
        raise ModelLoadError(
            f"invalid storage_options for {source}: {type(exc).__name__} "
            f"(options given: {', '.join(sorted(options)) or 'none'})",
            code="invalid_storage_options",
        ) from None
    return fs, source.removeprefix("s3://").rstrip("/")


def _open_url(source: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, root = fsspec.core.url_to_fs(source, **options)
    except (ImportError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"cannot open model source {source}: {type(exc).__name__}: {exc}",
            code="model_not_found",
        ) from None
    return fs, root.rstrip("/")


def _open_hub(
    repo_id: str, options: dict[str, Any], allow_patterns: Sequence[str] | None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Download (or find in the local cache) the files of a Hub repo that the loader reads."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = list(allow_patterns or _hub_patterns(["", "*"], variant=None, allow_pickle=False))
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, **options)
    except GatedRepoError:
        raise ModelLoadError(
            f"Hugging Face repo {repo_id} is gated: accept its license and set HF_TOKEN",
            code="access_denied",
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
        raise ModelLoadError(
            f"Hugging Face repo {repo_id} not found ({type(exc).__name__}); check the id, the "
            "revision and HF_TOKEN for private repos",
            code="model_not_found",
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub is unreachable"
        raise ModelLoadError(
            f"Hugging Face repo {repo_id} is not in the local cache and {why}; download it "
            "beforehand or point the model source at a local folder or s3:// URL",
            code="model_not_found",
        ) from None
    except TypeError:
        raise ModelLoadError(
            f"storage_options for Hugging Face repo {repo_id} must be snapshot_download "
            f"arguments (revision, token, cache_dir, ...); got: {', '.join(sorted(options))}",
            code="invalid_storage_options",
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"downloading Hugging Face repo {repo_id} failed: {type(exc).__name__}: {exc}",
            code="source_unreachable",
        ) from None
    return LocalFileSystem(), str(folder)


def _hub_patterns(folders: Sequence[str], variant: str | None, allow_pickle: bool) -> list[str]:
    """Hub download patterns: configs and tokenizer files anywhere in `folders`, plus only the
    weight files the loader would pick (a variant's files when one is set, else the full ones).
    """
    prefixes = [f"{f}/" if f else "" for f in folders]
    suffixes = [".safetensors", *(_PICKLE_SUFFIXES if allow_pickle else ())]
    infix = f".{variant}" if variant else ""
    patterns = ["model_index.json"]
    for prefix in prefixes:
        patterns += [f"{prefix}*.json", f"{prefix}*.txt", f"{prefix}*.model"]
        for stem in _PICKLE_STEMS:
            for suffix in suffixes:
                patterns += [f"{prefix}{stem}{infix}{suffix}", f"{prefix}{stem}{infix}-*{suffix}"]
    return patterns


def _source_kind(source: str) -> str:
    if source in BUILTIN_PRESETS:
        return "builtin"
    return source.split("://", 1)[0] if "://" in source else "path_or_hub"


# ---------------------------------------------------------------------------------------- reading


class _Reader:
    """Reads files under one root, each once, verifying the sha256 digests configured for them.

    `key_prefix` places the root inside the model's namespace for checksums: a preview decoder
    fetched from its own source is checked under `taesd/...` as if it were a subfolder.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        sha256: Mapping[str, str],
        key_prefix: str = "",
    ) -> None:
        self.fs, self.root, self.key_prefix = fs, root.rstrip("/"), key_prefix
        self.sha256 = {_normalize(k): v.lower() for k, v in sha256.items()}
        self.verified: set[str] = set()

    def url(self, rel: str) -> str:
        """The full location of `rel`, for messages (never includes credentials)."""
        return self.fs.unstrip_protocol(self.path(rel))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def list_files(self, rel: str) -> set[str]:
        try:
            entries = self.fs.ls(self.path(rel), detail=True)
        except Exception as exc:
            raise _io_error(exc, f"folder {self.url(rel)}") from None
        # Not "== file": the Hub cache's snapshot entries are symlinks, which fsspec calls "other".
        return {Path(e["name"]).name for e in entries if e.get("type") != "directory"}

    def is_folder(self, rel: str) -> bool:
        try:
            return self.fs.isdir(self.path(rel))
        except Exception as exc:
            raise _io_error(exc, self.url(rel)) from None

    def read(self, rel: str) -> bytes:
        try:
            data = self.fs.cat_file(self.path(rel))
        except Exception as exc:
            raise _io_error(exc, self.url(rel)) from None
        self._verify(rel, data)
        return data

    def read_json(self, rel: str) -> dict[str, Any]:
        try:
            return json.loads(self.read(rel))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            url = self.url(rel)
            raise ModelLoadError(f"{url} is not valid JSON: {exc}", code="corrupt_file") from None

    def check_all_verified(self, folder: str) -> None:
        """A digest configured for a file the loader never read is a typo, not a pass."""
        prefix = _normalize(f"{self.key_prefix}{folder}") + "/"
        unread = sorted(k for k in self.sha256 if k.startswith(prefix) and k not in self.verified)
        if unread:
            raise ModelLoadError(
                f"sha256 is configured for {', '.join(unread)} but the loader did not read "
                f"{'it' if len(unread) == 1 else 'them'}; check the paths (relative to the "
                "model source) and the variant",
                code="checksum_unverified",
            )

    def _verify(self, rel: str, data: bytes) -> None:
        key = _normalize(self.key_prefix + rel)
        expected = self.sha256.get(key)
        if expected is None:
            return
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ModelLoadError(
                f"checksum mismatch for {key}: expected sha256 {expected}, got {actual}",
                code="checksum_mismatch",
            )
        self.verified.add(key)


def _normalize(rel: str) -> str:
    return "/".join(p for p in rel.replace("\\", "/").split("/") if p not in ("", "."))


def _io_error(exc: Exception, what: str) -> ModelLoadError:
    if isinstance(exc, FileNotFoundError):
        return ModelLoadError(f"{what} not found", code="missing_file")
    if isinstance(exc, PermissionError):
        return ModelLoadError(
            f"access denied to {what}; check the credentials in the environment and the "
            "bucket's policy",
            code="access_denied",
        )
    return ModelLoadError(
        f"reading {what} failed: {type(exc).__name__}: {exc}", code="source_unreachable"
    )


# ----------------------------------------------------------------------------------- safetensors


def parse_safetensors(data: bytes, name: str) -> dict[str, TensorBlob]:
    """Split a safetensors file's bytes into zero-copy `TensorBlob` views.

    Layout: 8-byte little-endian header length, a JSON header of {name: {dtype, shape,
    data_offsets}}, then the data the offsets point into.
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
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
    header.pop("__metadata__", None)
    body = buffer[start:]
    needed = max((_offsets(info, name)[1] for info in header.values()), default=0)
    if body.size < needed:
        raise _truncated(name, start + needed, buffer.size)
    return {key: _blob(body, key, info, name) for key, info in header.items()}


def _offsets(info: Any, name: str) -> tuple[int, int]:
    try:
        begin, end = (int(x) for x in info["data_offsets"])
    except (TypeError, KeyError, ValueError):
        raise ModelLoadError(f"{name} has a malformed header", code="corrupt_file") from None
    return begin, end


def _blob(body: np.ndarray, key: str, info: dict[str, Any], name: str) -> TensorBlob:
    begin, end = _offsets(info, name)
    dtype, shape = info.get("dtype"), tuple(int(d) for d in info.get("shape", ()))
    if dtype not in _DTYPES:
        raise ModelLoadError(
            f"{name}: tensor {key} has unsupported dtype {dtype}", code="corrupt_file"
        )
    if end - begin != math.prod(shape) * _DTYPES[dtype][0] or begin < 0:
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


def _parse_pickle(data: bytes, name: str) -> dict[str, TensorBlob]:
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{name} could not be loaded with torch.load(weights_only=True): {exc}",
            code="corrupt_file",
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style .ckpt
    if not isinstance(state, dict):
        raise ModelLoadError(f"{name} does not hold a state dict", code="corrupt_file")
    return {k: _blob_from_tensor(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _blob_from_tensor(tensor: torch.Tensor) -> TensorBlob:
    names = {torch_name: st for st, (_, torch_name) in _DTYPES.items()}
    tensor = tensor.detach().contiguous()
    raw = tensor.reshape(-1).view(dtype=_torch_dtype("U8"))
    return TensorBlob(
        data=raw.numpy(),
        dtype=names[str(tensor.dtype).removeprefix("torch.")],
        shape=tuple(tensor.shape),
    )


# ------------------------------------------------------------------------------------ components


def load_model(
    config: ModelConfig,
    components: Sequence[str] = SDXL_COMPONENTS,
    extra: Mapping[str, str | None] | None = None,
) -> ModelWeights:
    """Read `components` of `config.source` (diffusers layout), plus optional `extra` ones.

    `extra` maps a component name to a subfolder of the source or to another source (the preview
    decoder: {"taesd": config.preview_decoder}); an extra that does not exist is left out.
    Components that model_index.json declares empty (null) are left out as well.
    """
    extras = {name: value for name, value in (extra or {}).items() if value}
    folders = [*components, *(v for v in extras.values() if "://" not in v)]
    patterns = _hub_patterns(folders, config.variant, config.allow_pickle)
    fs, root = open_source(config.source, config.storage_options, allow_patterns=patterns)
    index = _read_index(_Reader(fs, root, config.sha256), config.source)
    loaded: dict[str, ComponentWeights] = {}
    for name in components:
        library, class_name = _index_entry(index, name, config.source)
        if class_name is not None:
            loaded[name] = load_component(fs, root, name, config, library, class_name)
    for name, value in extras.items():
        component = _load_extra(fs, root, name, value, config)
        if component is not None:
            loaded[name] = component
    return ModelWeights(source=config.source, components=loaded)


def _read_index(reader: _Reader, source: str) -> dict[str, Any]:
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
    """A subfolder of the source if one is named `value`, else `value` as a source of its own."""
    local = "://" not in value and not value.startswith("/")
    if local and _Reader(fs, root, {}).is_folder(value):
        return load_component(fs, root, name, config, subfolder=value)
    same_kind = _source_kind(value) == _source_kind(config.source)
    try:
        extra_fs, extra_root = open_source(
            value,
            config.storage_options if same_kind else None,
            allow_patterns=[
                *_hub_patterns([""], config.variant, config.allow_pickle),
                *_hub_patterns([""], None, config.allow_pickle),
            ],
        )
        return load_component(
            extra_fs, extra_root, name, config, subfolder="", key_prefix=f"{name}/"
        )
    except ModelLoadError as exc:
        if exc.code not in _MISSING_CODES:
            raise
        logger.warning("optional component %s of %s left out: %s", name, config.id, exc.message)
        return None


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
) -> ComponentWeights:
    """Read one component from `root/subfolder` (default subfolder: `name`; "" is the root).

    Library and class default to what the component's own config or tokenizer config says.
    """
    folder = name if subfolder is None else subfolder
    reader = _Reader(fs, root, config.sha256, key_prefix)
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
    reader: _Reader,
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
    return ComponentWeights(name, library, class_name, model_config, tensors)


def _read_tensors(
    reader: _Reader, folder: str, files: set[str], config: ModelConfig
) -> dict[str, TensorBlob]:
    parse = parse_safetensors
    found = _pick_weights(files, config.variant, (".safetensors",), _SAFETENSORS_STEMS)
    if found is None:
        _refuse_or_explain(reader, folder, files, config)
        parse = _parse_pickle
        found = _pick_weights(files, config.variant, _PICKLE_SUFFIXES, _PICKLE_STEMS)
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


def _refuse_or_explain(reader: _Reader, folder: str, files: set[str], config: ModelConfig) -> None:
    """Called when a folder has no safetensors: say why loading cannot go on, unless it may."""
    if not any(f.endswith(_PICKLE_SUFFIXES) for f in files):
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
    reader: _Reader,
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


# -------------------------------------------------------------------------------------- building


def build_module(
    weights: ComponentWeights, device: str = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Build the component's module with its weights, in eval mode and without gradients.

    On CPU with the stored dtype the parameters *are* the arrays in `weights` (no copy), so
    replicas on one node share a single copy of the weights from Ray's object store.
    """
    import torch
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            module = _instantiate(weights)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ModelLoadError(
            f"component {weights.name}: cannot build {weights.class_name} from its config: {exc}",
            code="unsupported_model",
        ) from None
    names = _module_keys(module, weights)
    state = {
        names[key]: _to_device(_tensor_view(blob), device, dtype)
        for key, blob in weights.tensors.items()
    }
    _assign(module, state, weights)
    if torch.device(device).type != "cpu" or dtype is not None:
        module.to(device=device, dtype=dtype)  # buffers made at construction; parameters are no-ops
    return module.eval().requires_grad_(False)


def _instantiate(weights: ComponentWeights) -> torch.nn.Module:
    if weights.library == "diffusers":
        import diffusers

        cls = getattr(diffusers, weights.class_name, None)
        if cls is None:
            raise _unknown_class(weights)
        return cls.from_config(weights.config)
    if weights.library == "transformers":
        import transformers

        cls = getattr(transformers, weights.class_name, None)
        if cls is None:
            raise _unknown_class(weights)
        return cls._from_config(cls.config_class.from_dict(weights.config))
    raise _unknown_class(weights)


def _module_keys(module: torch.nn.Module, weights: ComponentWeights) -> dict[str, str]:
    """Checkpoint key -> module key. Identity for diffusers; transformers renames on load (v5's
    CLIPTextModel drops the `text_model.` prefix that SDXL's text_encoder checkpoints carry), so
    its own renaming rules are applied here too.
    """
    if weights.library != "transformers":
        return {key: key for key in weights.tensors}
    model = cast("transformers.PreTrainedModel", module)
    expected, prefix = model.state_dict(), model.base_model_prefix
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # transformers 4 renames nothing but the base model's prefix
        return {key: _swap_base_prefix(key, prefix, expected) for key in weights.tensors}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = {}
    for key in weights.tensors:
        # The same two tries as transformers' convert_and_load_state_dict_in_model.
        name, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:
            name, converter = rename_source_key(key, [], [], prefix, expected)
        if converter is not None and name in expected:
            raise ModelLoadError(
                f"component {weights.name}: tensor {key} needs transformers' weight conversion "
                f"({converter}), which copies; save the checkpoint with a current transformers",
                code="weights_mismatch",
            )
        names[key] = name
    return names


def _swap_base_prefix(key: str, prefix: str, expected: Mapping[str, Any]) -> str:
    if key.startswith(f"{prefix}.") and key.removeprefix(f"{prefix}.") in expected:
        return key.removeprefix(f"{prefix}.")
    return f"{prefix}.{key}" if f"{prefix}.{key}" in expected else key


def _unknown_class(weights: ComponentWeights) -> ModelLoadError:
    return ModelLoadError(
        f"component {weights.name}: unknown class {weights.library}.{weights.class_name}",
        code="unsupported_model",
    )


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPES[name][1])


def _tensor_view(blob: TensorBlob) -> torch.Tensor:
    """A CPU tensor over the blob's bytes: no copy, unless the bytes are misaligned for it."""
    import torch

    data = blob.data
    if data.ctypes.data % _DTYPES[blob.dtype][0] or not data.flags.c_contiguous:
        data = np.ascontiguousarray(data).copy()  # fresh numpy buffers are aligned
    with warnings.catch_warnings():
        # Object-store arrays are read-only; modules built here only run inference.
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        flat = torch.from_numpy(data)
    return flat.view(_torch_dtype(blob.dtype)).reshape(blob.shape)


def _to_device(tensor: torch.Tensor, device: str, dtype: torch.dtype | None) -> torch.Tensor:
    cast = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
    # Move in the stored (usually smaller) dtype, then cast on the target device.
    tensor = tensor.to(device)
    return tensor.to(dtype) if cast else tensor


def _assign(
    module: torch.nn.Module, state: dict[str, torch.Tensor], weights: ComponentWeights
) -> None:
    """Load `state` by assignment (sharing storage), then insist every tensor is materialized."""
    expected = set(module.state_dict())
    ignorable = _non_persistent_buffers(module) | {
        key
        for key in state
        for pattern in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ()
        if re.search(pattern, key)
    }
    unexpected = sorted(set(state) - expected - ignorable)
    if unexpected:
        raise ModelLoadError(
            f"component {weights.name}: the checkpoint has {len(unexpected)} tensors that "
            f"{weights.class_name} does not, e.g. {', '.join(unexpected[:3])}; does the config "
            "match the weights?",
            code="weights_mismatch",
        )
    try:
        module.load_state_dict(
            {k: v for k, v in state.items() if k in expected}, strict=False, assign=True
        )
    except RuntimeError as exc:
        raise ModelLoadError(f"component {weights.name}: {exc}", code="weights_mismatch") from None
    on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise ModelLoadError(
            f"component {weights.name}: no weights for {len(on_meta)} tensors, e.g. "
            f"{', '.join(on_meta[:3])}",
            code="missing_weights",
        )


def _non_persistent_buffers(module: torch.nn.Module) -> set[str]:
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        for name in sub._non_persistent_buffers_set
    }


def build_tokenizer(weights: ComponentWeights) -> transformers.PreTrainedTokenizerBase:
    """Rebuild a tokenizer from its files (written to a scratch folder for `from_pretrained`)."""
    import transformers

    cls = getattr(transformers, weights.class_name, None) or transformers.AutoTokenizer
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as folder:
        for filename, data in weights.files.items():
            if Path(filename).name != filename:
                raise ModelLoadError(f"tokenizer file name {filename!r} is not a plain name")
            (Path(folder) / filename).write_bytes(data)
        try:
            return cls.from_pretrained(folder)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(
                f"component {weights.name}: cannot build {weights.class_name} from "
                f"{', '.join(sorted(weights.files))}: {exc}",
                code="unsupported_model",
            ) from None


def build_scheduler_config(weights: ComponentWeights) -> dict[str, Any]:
    """The scheduler's config, with its class name, for `SchedulerClass.from_config`."""
    return {**json.loads(json.dumps(weights.config)), "_class_name": weights.class_name}

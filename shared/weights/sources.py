"""Model sources: where a model's files come from, and reading them with integrity checks.

A source is a built-in name (`BUILTIN_PRESETS`: tiny SDXLs, an IP-Adapter, LoRAs), a local folder,
`s3://bucket/prefix` through s3fs, any other fsspec URL, or a Hugging Face repo id, whose files are
downloaded first (only those the loader would read: see `hub_patterns`). `open_source` turns a
source into a filesystem and a root folder; `SourceReader` reads files under that root, each once,
hashing each file's bytes as it reads them (sha256: the digests components keep) and checking them
against the digests configured. Failures are `ModelLoadError`s with a stable code and never echo
credentials.
s3fs and huggingface_hub are imported only when a source needs them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shared.errors import ModelLoadError
from shared.weights.builtin import BUILTIN_PRESETS, resolve_builtin

# Names of the weight files the loader reads (its safetensors stems are a subset); Hub downloads
# fetch only files named so.
PICKLE_STEMS = ("diffusion_pytorch_model", "pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
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

    patterns = list(allow_patterns or hub_patterns(["", "*"], variant=None, allow_pickle=False))
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


def hub_patterns(folders: Sequence[str], variant: str | None, allow_pickle: bool) -> list[str]:
    """Hub download patterns: configs and tokenizer files anywhere in `folders`, plus only the
    weight files the loader would pick (a variant's files when one is set, else the full ones).
    """
    prefixes = [f"{f}/" if f else "" for f in folders]
    suffixes = [".safetensors", *(PICKLE_SUFFIXES if allow_pickle else ())]
    infix = f".{variant}" if variant else ""
    patterns = ["model_index.json"]
    for prefix in prefixes:
        patterns += [f"{prefix}*.json", f"{prefix}*.txt", f"{prefix}*.model"]
        for stem in PICKLE_STEMS:
            for suffix in suffixes:
                patterns += [f"{prefix}{stem}{infix}{suffix}", f"{prefix}{stem}{infix}-*{suffix}"]
    return patterns


def source_kind(source: str) -> str:
    if source in BUILTIN_PRESETS:
        return "builtin"
    return source.split("://", 1)[0] if "://" in source else "path_or_hub"


def options_for(
    source: str, model_source: str, storage_options: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """A model's storage_options, for another source of the same kind as the model's (the same
    bucket's endpoint and credentials); none for a source of another kind."""
    return storage_options if source_kind(source) == source_kind(model_source) else None


# ---------------------------------------------------------------------------------------- reading


class SourceReader:
    """Reads files under one root, each once, hashing each as it is read and verifying the sha256
    digests configured for them.

    `key_prefix` places the root inside the model's namespace for checksums: a preview decoder
    fetched from its own source is checked under `taesd/...` as if it were a subfolder. The
    digests of the files read are kept under the same keys until `take_digests`.
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
        self._digests: dict[str, str] = {}

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

    def take_digests(self) -> dict[str, str]:
        """{checksum key: sha256} of the files read since the last call."""
        digests, self._digests = self._digests, {}
        return digests

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
        # Every file is hashed, configured or not (~1 GB/s): the bytes are in memory already,
        # and a component's digests say exactly which weights a replica runs.
        key = _normalize(self.key_prefix + rel)
        actual = hashlib.sha256(data).hexdigest()
        self._digests[key] = actual
        expected = self.sha256.get(key)
        if expected is None:
            return
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

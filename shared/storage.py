"""Output storage through fsspec: each generated image written once, with its metadata JSON
beside it, and a URL to fetch it by.

Keys come from the request id and the image's index (`{request_id}/{index}.{format}`), so a
retried request overwrites nothing and stores nothing twice. On `s3://` the URL is a presigned
GET; on `file://` (or a plain path) it is a link the Router serves itself, `GET /v1/files/{key}`,
signed with an HMAC over the key and its expiry, so only links this server handed out work and
only until they expire. Ray-free and torch-free.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from typing import Any

import fsspec

from shared.config import StorageConfig
from shared.errors import NotFoundError, ServeError

KEY = re.compile(r"^[A-Za-z0-9._-]{1,80}/\d{1,3}\.(png|jpeg|webp|json)$")


class OutputStore:
    """Writes images and metadata under `config.url`; hands out URLs that expire."""

    def __init__(self, config: StorageConfig, secret: bytes, clock: Any = time.time) -> None:
        self.config = config
        self._secret = secret
        self._clock = clock
        self._fs, self._root = fsspec.core.url_to_fs(config.url, **config.storage_options)
        self._remote = not isinstance(self._fs, fsspec.implementations.local.LocalFileSystem)
        if not self._remote:
            self._fs.makedirs(self._root, exist_ok=True)

    def save(
        self, request_id: str, index: int, data: bytes, fmt: str, metadata: dict[str, Any]
    ) -> str:
        """Store one image (once) and its metadata; returns the image's key."""
        key = f"{_safe(request_id)}/{index}.{fmt}"
        path = self._path(key)
        if not self._fs.exists(path):
            if not self._remote:
                self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self._fs.pipe_file(path, data)
            meta = json.dumps(metadata, indent=2, sort_keys=True).encode()
            self._fs.pipe_file(self._path(f"{_safe(request_id)}/{index}.json"), meta)
        return key

    def url(self, key: str, base_url: str) -> str:
        """A URL for `key` valid for `link_ttl_s`: presigned on S3, a signed link otherwise."""
        ttl = self.config.link_ttl_s
        if self._remote:
            return str(self._fs.sign(self._path(key), expiration=ttl))
        expires = int(self._clock()) + ttl
        signature = self._sign(key, expires)
        return f"{base_url.rstrip('/')}/v1/files/{key}?expires={expires}&sig={signature}"

    def open_signed(self, key: str, expires: int, signature: str) -> bytes:
        """The bytes behind a link this store signed; a forged, expired or unknown link is a 404
        (never saying which, so links cannot be probed)."""
        valid = hmac.compare_digest(signature, self._sign(key, expires))
        if not KEY.match(key) or not valid or expires < self._clock():
            raise NotFoundError("no such file, or the link has expired", code="file_not_found")
        try:
            return bytes(self._fs.cat_file(self._path(key)))
        except FileNotFoundError:
            raise NotFoundError(
                "no such file, or the link has expired", code="file_not_found"
            ) from None
        except OSError as exc:
            raise ServeError(f"output storage failed: {type(exc).__name__}") from None

    def _sign(self, key: str, expires: int) -> str:
        digest = hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def _path(self, key: str) -> str:
        return f"{self._root.rstrip('/')}/{key}"


def _safe(request_id: str) -> str:
    """Request ids come from clients (`x-request-id`): keep only characters safe in a key."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", request_id)[:80].strip(".")
    return cleaned or "request"

"""A real S3-protocol server on loopback (moto) for tests of `s3://` model sources.

`S3Server` runs moto's S3 backend in a thread on 127.0.0.1 behind a small WSGI wrapper that logs
every request, so tests can assert resource outcomes ("each file was fetched once") and not only
results. Fixtures (register them in a conftest with `from tests.s3_server import ...`):

- `s3_server`: the session's server, with fake credentials in the environment (set before any
  test starts Ray, so Ray workers inherit them too).
- `s3_tiny_url`: the built-in tiny model uploaded once to `s3://models/tiny`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Without this, a missing credential makes botocore probe the EC2 metadata service (slow).
    "AWS_EC2_METADATA_DISABLED": "true",
}
MODELS_BUCKET = "models"


@dataclass(frozen=True)
class S3Request:
    method: str
    path: str  # path-style: /bucket/key
    query: str


class S3Server:
    """moto's S3 on 127.0.0.1 (a free port), with a log of the requests it answered."""

    def __init__(self) -> None:
        self.requests: list[S3Request] = []
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                """One line per request would drown pytest's output."""

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            "127.0.0.1", 0, self._logging(app), threaded=True, request_handler=QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def storage_options(self, **overrides: Any) -> dict[str, Any]:
        """s3fs options for this server, with timeouts short enough that a fault fails fast."""
        options: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "anon": False,
            "config_kwargs": {
                "connect_timeout": 2,
                "read_timeout": 10,
                "retries": {"max_attempts": 2, "mode": "standard"},
            },
        }
        return {**options, **overrides}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def create_bucket(self, bucket: str) -> None:
        client = self.client()
        if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=bucket)

    def upload_folder(
        self, local: Path, url: str, transform: Callable[[str, bytes], bytes | None] | None = None
    ) -> list[str]:
        """Upload every file under `local` to the `s3://bucket/prefix` in `url`; returns the keys.

        `transform(relative_path, data)` may alter a file's bytes, or return None to skip it —
        how tests plant truncated or missing files.
        """
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.create_bucket(bucket)
        client, keys = self.client(), []
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            data = path.read_bytes()
            body = transform(rel, data) if transform else data
            if body is None:
                continue
            key = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
            client.put_object(Bucket=bucket, Key=key, Body=body)
            keys.append(key)
        return keys

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def object_gets(self, url_prefix: str = "") -> list[str]:
        """Paths (`/bucket/key`) of object GETs (not listings) under an `s3://` prefix."""
        wanted = "/" + url_prefix.removeprefix("s3://")
        with self._lock:
            return [
                r.path
                for r in self.requests
                if r.method == "GET" and r.path.count("/") >= 2 and r.path.startswith(wanted)
            ]

    def _logging(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def logged(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            request = S3Request(
                environ["REQUEST_METHOD"],
                environ.get("PATH_INFO", ""),
                environ.get("QUERY_STRING", ""),
            )
            with self._lock:
                self.requests.append(request)
            return app(environ, start_response)

        return logged


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A loopback S3 server for the whole session, fake credentials in the environment."""
    saved = {name: os.environ.get(name) for name in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def s3_tiny_url(s3_server: S3Server, tiny_model_dir: Path) -> str:
    """The built-in tiny model at `s3://models/tiny` (uploaded once per session)."""
    url = f"s3://{MODELS_BUCKET}/tiny"
    s3_server.upload_folder(tiny_model_dir, url)
    return url

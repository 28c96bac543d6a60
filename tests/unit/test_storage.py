"""Output storage on a local folder and on a real S3-protocol server (moto, loopback): an image is
written once per key with its metadata beside it, `file://` links are signed and expire, and
S3 answers presigned URLs that fetch the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from shared.config import StorageConfig
from shared.errors import NotFoundError
from shared.storage import OutputStore
from tests.s3_server import S3Server

PNG = b"\x89PNG\r\n\x1a\nnot really, but bytes are bytes"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_local_store_writes_once_and_serves_signed_links(tmp_path: Path) -> None:
    clock = Clock()
    store = OutputStore(StorageConfig(url=f"file://{tmp_path}", link_ttl_s=600), b"s", clock)
    key = store.save("gen-1", 0, PNG, "png", {"seed": 7})
    assert key == "gen-1/0.png"
    assert (tmp_path / "gen-1" / "0.png").read_bytes() == PNG
    assert json.loads((tmp_path / "gen-1" / "0.json").read_text()) == {"seed": 7}
    # A retried request with the same id stores nothing twice.
    assert store.save("gen-1", 0, b"other bytes", "png", {"seed": 8}) == key
    assert (tmp_path / "gen-1" / "0.png").read_bytes() == PNG

    url = httpx.URL(store.url(key, "http://127.0.0.1:8000/"))
    assert url.path == "/v1/files/gen-1/0.png"
    expires, sig = int(url.params["expires"]), url.params["sig"]
    assert expires == 1_000_600
    assert store.open_signed(key, expires, sig) == PNG
    for forged in ((key, expires + 1, sig), ("gen-1/0.json", expires, sig), (key, expires, "x")):
        with pytest.raises(NotFoundError):
            store.open_signed(*forged)
    clock.now += 601
    with pytest.raises(NotFoundError):
        store.open_signed(key, expires, sig)  # expired


def test_client_request_ids_cannot_escape_the_store(tmp_path: Path) -> None:
    store = OutputStore(StorageConfig(url=str(tmp_path / "out")), b"s")
    key = store.save("../../etc/passwd", 0, PNG, "png", {})
    assert key == "_.._etc_passwd/0.png"
    assert (tmp_path / "out" / "_.._etc_passwd" / "0.png").is_file()
    with pytest.raises(NotFoundError):
        store.open_signed("../x/0.png", 2**40, "sig")


def test_an_s3_store_answers_presigned_urls(s3_server: S3Server) -> None:
    s3_server.create_bucket("outputs")
    options = s3_server.storage_options(key="testing", secret="testing")
    config = StorageConfig(url="s3://outputs/images", storage_options=options, link_ttl_s=120)
    store = OutputStore(config, b"unused on s3")
    key = store.save("gen-9", 1, PNG, "png", {"seed": 3})
    assert store.save("gen-9", 1, b"again", "png", {}) == key
    client = s3_server.client()
    stored = client.get_object(Bucket="outputs", Key="images/gen-9/1.png")["Body"].read()
    assert stored == PNG
    meta = client.get_object(Bucket="outputs", Key="images/gen-9/1.json")["Body"].read()
    assert json.loads(meta) == {"seed": 3}
    url = store.url(key, "http://unused")
    assert "X-Amz-Signature" in url or "Signature" in url
    assert httpx.get(url).content == PNG

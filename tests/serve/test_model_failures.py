"""Models whose weights cannot be loaded: each is reported with its reason, requests for it get a
clear 503 at once, the source is not re-read for every request, and the other models keep serving.
Nothing crash-loops: the ModelCache replica that recorded the failures is the one still running.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.s3_server import S3Server
from tests.serve.harness import REQUEST, app_args, cache_status, replica_actor_names

APP = "broken-models"
PICKLED_URL = "s3://models/pickled-unet"
UNET = "unet/diffusion_pytorch_model"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


def upload_with_pickled_unet(s3_server: S3Server, tiny_model_dir: Path) -> None:
    """The tiny model on S3 with its UNet saved by `torch.save` (a .bin) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    s3_server.upload_folder(
        tiny_model_dir, PICKLED_URL, lambda rel, data: None if rel.startswith(UNET) else data
    )
    buffer = io.BytesIO()
    torch.save(load_file(tiny_model_dir / f"{UNET}.safetensors"), buffer)
    bucket, _, prefix = PICKLED_URL.removeprefix("s3://").partition("/")
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/{UNET}.bin", Body=buffer.getvalue())


@pytest.fixture(scope="module")
def broken(ray_session: int, s3_server: S3Server, tiny_model_dir: Path) -> Iterator[httpx.Client]:
    from ray import serve

    from deployments.app import build_app

    upload_with_pickled_unet(s3_server, tiny_model_dir)
    options = s3_server.storage_options(
        key="testing", secret="testing", client_kwargs={"region_name": "us-east-1"}
    )
    models = [
        {"id": "healthy", "source": str(tiny_model_dir), "preload": True},
        {"id": "pickled", "source": PICKLED_URL, "storage_options": options, "preload": True},
        {
            "id": "tampered",
            "source": str(tiny_model_dir),
            "sha256": {VAE_FILE: "0" * 64},
            "preload": False,
        },
    ]
    args = app_args(models)
    args["cache"] = {"retry_failed_after_s": 3600}
    s3_server.clear_log()
    serve.run(build_app(args), name=APP, route_prefix="/broken")
    with httpx.Client(base_url=f"http://127.0.0.1:{ray_session}/broken", timeout=120) as http:
        yield http
    serve.delete(APP)


def generate(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/generate", json={**REQUEST, "model": model, "seed": 1})


def card(http: httpx.Client, model: str) -> dict[str, Any]:
    return next(c for c in http.get("/v1/models").json()["data"] if c["id"] == model)


def test_refused_pickle_is_reported_and_answered_with_a_clear_error(
    broken: httpx.Client, s3_server: S3Server
) -> None:
    (cache_replica,) = replica_actor_names(APP, "ModelCache")
    state = card(broken, "pickled")["state"]
    assert state["state"] == "failed" and state["error"]["code"] == "pickle_refused"

    for _ in range(2):
        response = generate(broken, "pickled")
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "pickle_refused" and "allow_pickle" in error["message"]

    # The other models serve; the server stays ready and names the broken model.
    assert generate(broken, "healthy").status_code == 200
    ready = broken.get("/readyz")
    assert ready.status_code == 200
    failed = ready.json()["failed_models"]
    assert "pickled" in failed and "healthy" not in failed

    # Resource outcomes: the pickle was never downloaded, the source was read once (at preload,
    # not per request), and the cache replica that recorded the failure is still the same one.
    assert not any(path.endswith(".bin") for path in s3_server.object_gets(PICKLED_URL))
    assert cache_status(APP)["pickled"]["loads"] == 1
    assert replica_actor_names(APP, "ModelCache") == [cache_replica]


def test_checksum_mismatch_fails_on_first_use_and_is_not_retried_per_request(
    broken: httpx.Client,
) -> None:
    assert card(broken, "tampered")["state"]["state"] == "not_loaded"
    for _ in range(3):
        response = generate(broken, "tampered")
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "checksum_mismatch" and VAE_FILE in error["message"]
    state = card(broken, "tampered")["state"]
    assert state["state"] == "failed" and state["loads"] == 1
    assert generate(broken, "healthy").status_code == 200


# --------------------------------------------------------------------------- retry after a pause

RETRY_APP = "retried-model"
RETRY_URL = "s3://models/retried-tiny"


def test_a_fixed_source_is_picked_up_after_the_pause(
    ray_session: int, s3_server: S3Server, tiny_model_dir: Path
) -> None:
    """A truncated upload fails the model; once the file is fixed, the first request after
    `retry_failed_after_s` loads it, without redeploying anything."""
    from ray import serve

    from deployments.app import build_app
    from tests.serve.harness import wait_for

    unet = f"{UNET}.safetensors"
    s3_server.upload_folder(
        tiny_model_dir,
        RETRY_URL,
        lambda rel, data: data[: len(data) // 2] if rel == unet else data,
    )
    options = s3_server.storage_options(
        key="testing", secret="testing", client_kwargs={"region_name": "us-east-1"}
    )
    model = {"id": "retried", "source": RETRY_URL, "storage_options": options, "preload": False}
    args = app_args([model])
    args["cache"] = {"retry_failed_after_s": 5}
    serve.run(build_app(args), name=RETRY_APP, route_prefix="/retried")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{ray_session}/retried", timeout=120) as http:
            response = generate(http, "retried")
            assert response.status_code == 503 and response.json()["error"]["code"] == "truncated"
            # Its only model is broken: this server has nothing to serve, so it is not ready.
            assert http.get("/readyz").status_code == 503

            bucket, _, prefix = RETRY_URL.removeprefix("s3://").partition("/")
            body = (tiny_model_dir / unet).read_bytes()
            s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/{unet}", Body=body)

            assert generate(http, "retried").status_code == 503  # still inside the pause
            wait_for(lambda: generate(http, "retried").status_code == 200, timeout_s=60)
            assert http.get("/readyz").status_code == 200
        status = cache_status(RETRY_APP)["retried"]
        assert status["state"] == "cached" and status["loads"] == 2
    finally:
        serve.delete(RETRY_APP)

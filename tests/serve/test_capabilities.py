"""What a client asks before it sends work, on the default app: capabilities (what each model
takes, where it runs), samplers, a dry run (`/v1/generate/validate`: the request as it would
run, its estimate, the same refusals as /v1/generate), and the reproducibility record on every
local result: its `metadata.request` sent back reproduces the pixels."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from shared.api.capabilities import peak_memory_bytes
from shared.api.vocabulary import SCHEDULER_NAMES
from shared.config import BatchingConfig, LimitsConfig
from tests.serve.conftest import APP_NAME
from tests.serve.harness import cache_status, default_app_args, wait_for

TINY = {"model": "tiny", "prompt": "a photo of a cat"}
HEX = set("0123456789abcdef")


def png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def noise(seed: int, side: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def pixels(result: dict[str, Any]) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(image["b64"]))))
        for image in result["images"]
    ]


def job_stats(job_id: str) -> dict[str, Any] | None:
    from ray import serve

    pipeline = serve.get_deployment_handle("SDXLPipeline", app_name=APP_NAME)
    return pipeline.job_stats.remote(job_id).result(timeout_s=30)


def generate(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_capabilities_describe_the_default_app(client: httpx.Client) -> None:
    args = default_app_args()
    loads = {model: state["loads"] for model, state in cache_status(APP_NAME).items()}
    response = client.get("/v1/capabilities")
    assert response.status_code == 200, response.text
    answer = response.json()
    models = {model["id"]: model for model in answer["models"]}
    assert list(models) == [model["id"] for model in args["models"]]
    tiny, inpaint = models["tiny"], models["tiny-inpaint"]
    # Both are preloaded on the one replica, so what only a built engine shows is known.
    assert (tiny["tasks"]["inpainting_unet"], inpaint["tasks"]["inpainting_unet"]) == (False, True)
    assert (tiny["tasks"]["image_prompt"], inpaint["tasks"]["image_prompt"]) == (True, False)
    for model, config in zip(models.values(), args["models"], strict=True):
        assert all(model["tasks"][task] for task in ("txt2img", "img2img", "inpaint"))
        assert model["samplers"] == list(SCHEDULER_NAMES)
        assert model["preview_kinds"] == ["none", "latent", "tiny", "full"]  # both carry taesd
        assert model["loras"] == [lora["id"] for lora in config.get("loras", [])]
        controlnets = [net["id"] for net in config.get("controlnets", [])]
        assert [net["id"] for net in model["controlnets"]] == controlnets
        assert all(net["preprocessors"] == ["none", "canny"] for net in model["controlnets"])
        assert model["tasks"]["controlnet"] == bool(controlnets)
        refiner = config.get("refiner")
        assert (model["refiner"] or {}).get("id") == (refiner or {}).get("id")
        assert model["tasks"]["refiner"] == (refiner is not None)
        assert (model["default_width"], model["default_height"]) == (64, 64)
        assert model["default_steps"] == config["default_steps"]
        assert model["runtime"] == {
            "device": "cpu",
            "gpu_ids": [],
            "dtype": "float32",
            "vae_dtype": "float32",
            "built": True,
        }
    assert answer["provider_models"] == []
    assert answer["limits"] == LimitsConfig(**args["limits"]).model_dump()
    assert answer["batching"] == BatchingConfig(**args["batching"]).model_dump()
    # Asking loaded nothing.
    assert {m: s["loads"] for m, s in cache_status(APP_NAME).items()} == loads
    schedulers = client.get("/v1/schedulers").json()["data"]
    assert [entry["name"] for entry in schedulers] == list(SCHEDULER_NAMES)


def test_validate_resolves_a_request_without_running_it(client: httpx.Client) -> None:
    response = client.post("/v1/generate/validate", json=TINY, headers={"x-request-id": "val-1"})
    assert response.status_code == 200, response.text
    answer = response.json()
    request = answer["request"]
    assert (request["width"], request["height"], request["steps"]) == (64, 64, 8)
    assert isinstance(request["seed"], int) and request["scheduler"] is None  # the checkpoint's
    assert answer["images"] == {}
    assert set(answer["estimate"]) == {"queue_ms", "run_ms", "peak_memory_bytes"}
    assert job_stats("val-1") is None  # nothing was queued
    # The request it answers is one /v1/generate takes as it is.
    again = client.post("/v1/generate/validate", json=request).json()
    assert again["request"] == request


@pytest.mark.parametrize("scheduler", [None, "dpmpp_2m_sde_karras"])
def test_a_txt2img_result_reproduces_from_its_metadata(
    client: httpx.Client, scheduler: str | None
) -> None:
    body = {**TINY, "n": 2, "scheduler": scheduler}
    first = generate(client, body)
    metadata = first["metadata"]
    request = metadata["request"]
    assert isinstance(request["seed"], int) and request["steps"] == 8 and request["n"] == 2
    resolved = client.post("/v1/generate/validate", json={**body, "seed": request["seed"]})
    assert resolved.json()["request"] == request  # validate resolves as generate did
    second = generate(client, request)
    assert [image["seed"] for image in second["images"]] == [request["seed"], request["seed"] + 1]
    for a, b in zip(pixels(first), pixels(second), strict=True):
        assert np.array_equal(a, b)
    for component in ("unet", "vae"):
        files = metadata["components"][component]
        assert files and all(len(d) == 64 and set(d) <= HEX for d in files.values()), files
    assert second["metadata"]["components"] == metadata["components"]
    versions = metadata["versions"]
    assert set(versions) == {
        "torch",
        "diffusers",
        "transformers",
        "ray",
        "python",
        "diffusion_serve",
    }
    assert all(versions.values())
    scheduler = metadata["scheduler"]
    assert scheduler["class_name"] == scheduler["config"]["_class_name"]
    assert scheduler["config"]["num_train_timesteps"] > 0
    assert len(json.dumps(metadata)) < 10_000  # small on the wire: no image bytes


def test_an_img2img_result_reproduces_from_its_metadata_and_its_image(
    client: httpx.Client,
) -> None:
    init = noise(3)
    first = generate(client, {**TINY, "init_image": png(init)})
    metadata = first["metadata"]
    request = metadata["request"]
    assert request["init_image"] is None and request["strength"] == 0.8  # the default, filled in
    digest = hashlib.sha256(init.tobytes()).hexdigest()
    assert metadata["images"] == {"init_image": {"sha256": digest, "width": 64, "height": 64}}
    # Sent as a data: URL this time: the same pixels, so the same digest and the same result.
    data_url = "data:image/png;base64," + png(init)
    second = generate(client, {**request, "init_image": data_url})
    assert second["metadata"]["images"] == metadata["images"]
    assert np.array_equal(pixels(first)[0], pixels(second)[0])


def _refusals() -> dict[str, dict[str, Any]]:
    mask = "data:image/png;base64," + png(np.zeros((32, 32, 3), dtype=np.uint8))
    return {
        "unknown-model": {**TINY, "model": "nope"},
        "width": {**TINY, "width": 1000},
        "n": {**TINY, "n": 5},
        "steps": {**TINY, "steps": 101},
        "image-prompt": {**TINY, "model": "tiny-inpaint", "image_prompt": png(noise(1))},
        "not-an-image": {**TINY, "init_image": base64.b64encode(b"GIF89a....").decode()},
        "mask-size": {**TINY, "init_image": png(noise(2)), "mask": mask},
    }


@pytest.mark.parametrize("name", list(_refusals()))
def test_validate_refuses_exactly_what_generate_refuses(client: httpx.Client, name: str) -> None:
    body = _refusals()[name]
    generated = client.post("/v1/generate", json=body)
    validated = client.post("/v1/generate/validate", json=body)
    assert 400 <= generated.status_code < 500, generated.text
    assert validated.status_code == generated.status_code
    assert validated.json() == generated.json()


def test_the_estimate_comes_from_measured_steps_and_the_cached_weights(
    client: httpx.Client,
) -> None:
    generate(client, {**TINY, "seed": 1})  # at least one step measured at 64x64

    def estimate(**fields: Any) -> dict[str, Any]:
        response = client.post("/v1/generate/validate", json={**TINY, **fields})
        assert response.status_code == 200, response.text
        return response.json()["estimate"]

    idle = estimate(steps=10)
    assert idle["queue_ms"] == 0 and idle["run_ms"] > 0
    assert estimate(steps=20)["run_ms"] == pytest.approx(2 * idle["run_ms"])
    weights = cache_status(APP_NAME)["tiny"]["bytes"]
    assert idle["peak_memory_bytes"] == peak_memory_bytes(weights, 1, 5.0, 64, 64, "float32")
    peaks = [estimate(n=n)["peak_memory_bytes"] for n in (1, 2, 4)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 3
    assert estimate(width=128, height=128)["peak_memory_bytes"] > peaks[0]

    # Fill the batcher (two requests of 4 images: max_batch_images is 8): one more image must
    # wait until one of them is done, and the estimate says so.
    started = [threading.Event(), threading.Event()]
    stop = threading.Event()

    def run(index: int) -> None:
        body = {**TINY, "n": 4, "steps": 100, "seed": index, "stream": True}
        with client.stream("POST", "/v1/generate", json=body) as response:
            for line in response.iter_lines():
                if '"event":"step"' in line.replace(" ", ""):
                    started[index].set()
                if stop.is_set():
                    return  # closing the stream cancels the request

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        assert all(event.wait(120) for event in started)
        busy = estimate(steps=10)
        assert busy["queue_ms"] > 0 and busy["run_ms"] > 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    wait_for(lambda: estimate()["queue_ms"] == 0, what="an idle batcher")


def test_the_batcher_estimates_nothing_before_it_measured_a_step() -> None:
    from shared.engine.batcher import StepBatcher

    batcher = StepBatcher(max_batch_images=4)
    try:
        assert batcher.estimate(64, 64, 8, 1) == {"queue_ms": None, "run_ms": None}
        batcher.step_times.record(64 * 64, 10.0)
        assert batcher.estimate(64, 64, 8, 1) == {"queue_ms": 0.0, "run_ms": 80.0}
        # Another size: the nearest measured one, scaled by pixels.
        assert batcher.estimate(128, 128, 8, 1)["run_ms"] == pytest.approx(320.0)
    finally:
        batcher.close()

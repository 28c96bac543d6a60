"""LoRAs on the default app over HTTP and the handle API: a LoRA changes the image, scale 0 is
the plain image, concurrent requests with different LoRA sets each get the image they get alone,
and unknown or too many LoRAs are refused with their 422."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.serve.harness import app_args, deploy
from tests.serve.test_batching import finished, image_pixels
from tests.serve.test_handles_and_cancel import handle_client  # noqa: F401 (a fixture)
from tests.serve.test_image_inputs import concurrently_as_alone, post

BASE = {"model": "tiny", "prompt": "a lighthouse at dusk", "steps": 6, "seed": 4}
STYLE = [{"id": "tiny-lora", "scale": 1.0}]
BOTH = [{"id": "tiny-lora", "scale": 0.5}, {"id": "tiny-kohya", "scale": 1.0}]


def test_a_lora_over_http_and_the_handle(client: httpx.Client, handle_client: Any) -> None:  # noqa: F811
    plain = image_pixels(post(client, BASE))
    styled = post(client, {**BASE, "loras": STYLE})
    via_handle = handle_client.unary.remote({**BASE, "loras": STYLE}).result(timeout_s=120)
    assert np.array_equal(image_pixels(styled), image_pixels(via_handle))
    assert not np.array_equal(image_pixels(styled), plain)
    off = post(client, {**BASE, "loras": [{"id": "tiny-lora", "scale": 0.0}]})
    assert np.array_equal(image_pixels(off), plain)


def test_lora_sets_batch_apart_and_each_gets_its_own_image(client: httpx.Client) -> None:
    bodies = [
        {**BASE, "seed": 31},
        {**BASE, "seed": 32, "loras": STYLE},
        {**BASE, "seed": 33, "loras": BOTH},
        {**BASE, "seed": 34, "loras": STYLE},
    ]
    ids = concurrently_as_alone(client, [{**body, "steps": 16} for body in bodies])
    # A set runs only with its own: the lone BOTH request never shares a call.
    assert finished(ids[2])["max_batch_requests"] == 1


def test_unknown_and_too_many_loras_are_422(client: httpx.Client) -> None:
    unknown = client.post("/v1/generate", json={**BASE, "loras": [{"id": "nope"}]})
    assert unknown.status_code == 422
    assert unknown.json()["error"] == {
        "type": "invalid_request_error",
        "code": "unknown_lora",
        "param": "loras.0.id",
        "message": "unknown LoRA 'nope' for model 'tiny'; its LoRAs: tiny-kohya, tiny-lora",
    }
    many = [{"id": f"l{i}"} for i in range(5)]
    too_many = client.post("/v1/generate", json={**BASE, "loras": many})
    assert too_many.json()["error"]["code"] == "too_many_loras"
    twice = client.post("/v1/generate", json={**BASE, "loras": STYLE + STYLE})
    assert twice.status_code == 422 and twice.json()["error"]["param"] == "loras"


AFFINITY_APP = "lora-affinity"


@pytest.fixture(scope="module")
def two_replicas(app_url: str, tiny_model_dir: Any) -> Iterator[Any]:
    from ray import serve

    loras = [
        {"id": "tiny-lora", "source": "tiny-lora"},
        {"id": "tiny-kohya", "source": "tiny-lora-kohya"},
    ]
    args = app_args(
        [{"id": "tiny", "source": str(tiny_model_dir), "loras": loras}], pipeline_replicas=2
    )
    router = deploy(AFFINITY_APP, args)
    try:
        yield router
    finally:
        serve.delete(AFFINITY_APP)


def test_a_lora_set_meets_the_replica_that_holds_it(two_replicas: Any) -> None:
    """Serve multiplexes on model + LoRA ids: after a set's first request, its requests go to a
    replica that already holds that set (measured as the share that did)."""
    from shared.api.schemas import GenerateRequest

    sets = [[], [{"id": "tiny-lora", "scale": 0.7}], [{"id": "tiny-kohya", "scale": 1.0}]]
    held: dict[str, set[str]] = {}  # replica -> LoRA sets it has served
    hits = total = 0
    for index in range(18):
        loras = sets[index % 3]
        request = GenerateRequest(model="tiny", prompt="a cat", steps=2, seed=index, loras=loras)
        result = two_replicas.generate.remote(request).result(timeout_s=120)
        replica = finished(result.id, AFFINITY_APP)["replica"]
        key = ",".join(lora["id"] for lora in loras)
        if index >= 3:  # every set has been served once
            total += 1
            hits += key in held.get(replica, set())
        held.setdefault(replica, set()).add(key)
    share = hits / total
    print(f"LoRA-set affinity: {share:.0%} of {total} requests met a replica holding their set")
    assert share >= 0.9, held

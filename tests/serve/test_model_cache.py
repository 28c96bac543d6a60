"""ModelCache through Serve: one load under concurrent first requests, `s3://` sources end to end,
and recovery when the cache replica (the owner of every weight object) dies.

Each test deploys its own small app (distinct name, no route prefix) on the session's Ray and
deletes it at the end, so it never disturbs the default app other serve tests use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.s3_server import S3Server
from tests.serve.harness import (
    app_args,
    assert_image,
    cache_status,
    deploy,
    generate,
    kill_replica,
    replica_actor_names,
    wait_for,
)

S3_APP = "cache-s3"
LOSS_APP = "cache-loss"
TAESD = {"taesd": "taesd"}


# ------------------------------------------------------------------------------------- s3 source


@pytest.fixture(scope="module")
def s3_app(ray_session: int, s3_server: S3Server, tiny_model_dir: Path) -> Iterator[tuple]:
    """Tiny at its own `s3://` prefix (GET counts of other tests never mix in), not preloaded,
    served by two SDXLPipeline replicas."""
    from ray import serve

    url = "s3://models/cache-test-tiny"
    keys = s3_server.upload_folder(tiny_model_dir, url)
    # Credentials in the options too: Ray workers may predate the fixture's environment.
    options = s3_server.storage_options(
        key="testing", secret="testing", client_kwargs={"region_name": "us-east-1"}
    )
    model = {
        "id": "s3-tiny",
        "source": url,
        "storage_options": options,
        "preload": False,
        # No configured size: requests that omit one get the checkpoint's own.
        "default_width": None,
        "default_height": None,
    }
    s3_server.clear_log()
    router = deploy(S3_APP, app_args([model], pipeline_replicas=2))
    try:
        yield router, url, keys
    finally:
        serve.delete(S3_APP)


def test_concurrent_first_requests_load_the_model_once(s3_app: tuple, s3_server: S3Server) -> None:
    router, url, keys = s3_app
    assert cache_status(S3_APP)["s3-tiny"]["state"] == "not_loaded"
    assert s3_server.object_gets(url) == []  # preload: false really defers the load

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda seed: generate(router, "s3-tiny", seed), range(8)))

    for seed, result in enumerate(results):
        assert_image(result, seed)
    gets = Counter(s3_server.object_gets(url))
    assert gets, "the model was never read from S3"
    assert max(gets.values()) == 1, gets  # one load: every object fetched exactly once
    assert set(gets) <= {f"/models/{key}" for key in keys}
    assert any(path.endswith("unet/diffusion_pytorch_model.safetensors") for path in gets)
    assert cache_status(S3_APP)["s3-tiny"]["state"] == "cached"


def test_an_unset_size_is_the_checkpoints_own(s3_app: tuple) -> None:
    router, _, _ = s3_app
    request = {"model": "s3-tiny", "prompt": "a cat", "steps": 2, "seed": 3}
    result = router.generate.remote(request).result(timeout_s=180).model_dump()
    (image,) = result["images"]
    # tiny's UNet sample_size 16 x its VAE's scale factor 8; a tiny-model default would be 64.
    assert (image["width"], image["height"]) == (128, 128)
    assert cache_status(S3_APP)["s3-tiny"]["state"] == "cached"


def test_s3_model_serves_from_ram_on_every_replica(s3_app: tuple, s3_server: S3Server) -> None:
    router, url, _ = s3_app
    first = generate(router, "s3-tiny", seed=100)  # loads if this test runs alone
    assert_image(first, 100)
    gets = Counter(s3_server.object_gets(url))

    # Enough concurrent requests that both SDXLPipeline replicas build their engine.
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda s: generate(router, "s3-tiny", s), range(101, 113)))
    for seed, result in zip(range(101, 113), results, strict=True):
        assert_image(result, seed)

    assert len(replica_actor_names(S3_APP, "SDXLPipeline")) == 2
    assert Counter(s3_server.object_gets(url)) == gets  # no replica went back to S3
    assert max(gets.values()) == 1, gets
    # The same seed gives the same picture whichever replica ran it.
    again = generate(router, "s3-tiny", seed=100)
    assert again["images"][0]["b64"] == first["images"][0]["b64"]


# ------------------------------------------------------------------------------------ cache loss


@pytest.fixture()
def loss_app(ray_session: int, tiny_model_dir: Path) -> Iterator[Any]:
    from ray import serve

    models = [
        {"id": "loss-a", "source": str(tiny_model_dir), "preload": True},
        {"id": "loss-b", "source": str(tiny_model_dir), "preload": False},
    ]
    router = deploy(LOSS_APP, app_args(models))
    try:
        yield router
    finally:
        serve.delete(LOSS_APP)


def test_requests_survive_the_death_of_the_cache_replica(loss_app: Any) -> None:
    router = loss_app
    assert_image(generate(router, "loss-a", seed=1), 1)
    killed = kill_replica(LOSS_APP, "ModelCache")

    # Serve replaces the replica; the new one preloads `loss-a` again from its source.
    def replaced() -> bool:
        names = replica_actor_names(LOSS_APP, "ModelCache")
        return bool(names) and killed not in names

    wait_for(replaced, what="a new ModelCache replica")
    wait_for(lambda: cache_status(LOSS_APP)["loss-a"]["state"] == "cached", what="loss-a reloaded")

    # Built modules outlive their weights' owner (their arrays pin the objects they map) ...
    assert_image(generate(router, "loss-a", seed=2, prompt="a dog"), 2)
    # ... a model never loaded before is loaded by the new cache ...
    assert_image(generate(router, "loss-b", seed=3), 3)
    assert cache_status(LOSS_APP)["loss-b"]["state"] == "cached"

    # ... and a fresh pipeline replica builds from the new cache's objects.
    killed_pipeline = kill_replica(LOSS_APP, "SDXLPipeline")

    def pipeline_replaced() -> bool:
        names = replica_actor_names(LOSS_APP, "SDXLPipeline")
        return bool(names) and killed_pipeline not in names

    wait_for(pipeline_replaced, what="a new SDXLPipeline replica")
    result = wait_for(
        lambda: generate(router, "loss-a", seed=4, prompt="a cow"), what="generate on new replica"
    )
    assert_image(result, 4)


def test_a_reported_loss_reloads_the_model_once(loss_app: Any) -> None:
    """Replicas that find the weights gone tell the cache which refs were lost: the first report
    reloads from the source, the rest get the new refs."""
    from ray import serve

    cache = serve.get_deployment_handle("ModelCache", app_name=LOSS_APP)
    lost = cache.get.remote("loss-a").result(timeout_s=60)
    assert cache_status(LOSS_APP)["loss-a"]["loads"] == 1
    stale = [ref.hex() for ref in lost.values()]

    reports = [cache.get.remote("loss-a", stale=stale) for _ in range(3)]
    fresh = [report.result(timeout_s=120) for report in reports]

    assert cache_status(LOSS_APP)["loss-a"]["loads"] == 2
    hexes = [sorted(ref.hex() for ref in refs.values()) for refs in fresh]
    assert hexes[0] == hexes[1] == hexes[2]  # one reload, shared by every reporter
    assert not set(hexes[0]) & set(stale)
    # Refs nobody reported as lost are served as they are.
    assert cache.get.remote("loss-a", stale=stale).result(timeout_s=60) == fresh[0]
    assert cache_status(LOSS_APP)["loss-a"]["loads"] == 2
    assert_image(generate(router=loss_app, model="loss-a", seed=5), 5)


# -------------------------------------------------------------------------------------- eviction

EVICT_APP = "cache-evict"


def test_eviction_takes_only_models_no_replica_holds(
    ray_session: int, tiny_model_dir: Path
) -> None:
    """Room for one and a half models; the pipeline replica holds two at a time (multiplexing).
    A model a replica holds is never evicted, even past capacity; once the replica unloads it,
    the next load evicts it; and the replica serves throughout."""
    from ray import serve

    from shared.config import ModelConfig
    from shared.weights.loader import load_model

    one_model = load_model(ModelConfig(id="x", source=str(tiny_model_dir)), extra=TAESD).nbytes
    models = [
        {"id": f"evict-{name}", "source": str(tiny_model_dir), "preload": name == "a"}
        for name in "abc"
    ]
    args = app_args(models)
    args["cache"] = {"capacity_bytes": int(one_model * 1.5)}
    router = deploy(EVICT_APP, args)

    def states() -> dict[str, tuple[str, int]]:
        status = cache_status(EVICT_APP)
        return {m[-1]: (status[m]["state"], status[m]["holders"]) for m in status}

    try:
        first = generate(router, "evict-a", seed=7)
        assert_image(first, 7)
        assert_image(generate(router, "evict-b", seed=8), 8)
        # Both in use by the replica: over capacity, but nothing it holds is dropped.
        assert states() == {"a": ("cached", 1), "b": ("cached", 1), "c": ("not_loaded", 0)}

        # A third model: the replica unloads its least recent one (a), which frees it for eviction.
        assert_image(generate(router, "evict-c", seed=9), 9)
        assert states() == {"a": ("not_loaded", 0), "b": ("cached", 1), "c": ("cached", 1)}

        # Back to a: reloaded once (b, now unloaded, makes room); same seed, same picture.
        again = generate(router, "evict-a", seed=7)
        assert again["images"][0]["b64"] == first["images"][0]["b64"]
        assert states() == {"a": ("cached", 1), "b": ("not_loaded", 0), "c": ("cached", 1)}
        assert cache_status(EVICT_APP)["evict-a"]["loads"] == 2
    finally:
        serve.delete(EVICT_APP)

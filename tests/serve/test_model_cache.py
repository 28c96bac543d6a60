"""ModelCache through Serve: one load under concurrent first requests, `s3://` sources end to end,
and recovery when the cache replica (the owner of every weight object) dies.

Each test deploys its own small app (distinct name, no route prefix) on the session's Ray and
deletes it at the end, so it never disturbs the default app other serve tests use.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.s3_server import S3Server
from tests.serve.harness import default_app_args

S3_APP = "cache-s3"
LOSS_APP = "cache-loss"
REQUEST = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 2}


def app_args(models: list[dict[str, Any]], pipeline_replicas: int = 1) -> dict[str, Any]:
    args = default_app_args()
    args["models"] = [
        {"default_width": 64, "default_height": 64, "default_steps": 2, **model} for model in models
    ]
    pipeline = args["pipeline_deployment"]
    pipeline.pop("autoscaling", None)
    # Small reservations: the session's Ray also runs the default app on a 2-core CI machine.
    pipeline.update(
        num_cpus=0.1, num_replicas=pipeline_replicas, max_ongoing_requests=4, max_queued_requests=32
    )
    # Notice a dead cache replica within about a second instead of the default 10 s.
    args["cache_deployment"].update(health_check_period_s=1, health_check_timeout_s=10)
    return args


def deploy(name: str, args: dict[str, Any]) -> Any:
    from ray import serve

    from deployments.app import build_app

    return serve.run(build_app(args), name=name, route_prefix=None)


def generate(router: Any, model: str, seed: int, **extra: Any) -> dict[str, Any]:
    response = router.generate.remote({**REQUEST, "model": model, "seed": seed, **extra})
    result = response.result(timeout_s=180)
    return result.model_dump() if hasattr(result, "model_dump") else result


def wait_for(condition: Callable[[], Any], timeout_s: float = 120, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy (exceptions count as "not yet")."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
            last = value
        except Exception as exc:  # the replica may be restarting
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what or condition}: {last!r}")


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment (via the GCS; needs no dashboard)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    )


def kill_replica(app: str, deployment: str) -> str:
    import ray

    (name,) = replica_actor_names(app, deployment)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def cache_status(app: str) -> dict[str, Any]:
    from ray import serve

    cache = serve.get_deployment_handle("ModelCache", app_name=app)
    return cache.status.remote().result(timeout_s=30)


def assert_image(result: dict[str, Any], seed: int) -> None:
    assert result["backend"] == "local"
    (image,) = result["images"]
    assert image["seed"] == seed and image["b64"]


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
    model = {"id": "s3-tiny", "source": url, "storage_options": options, "preload": False}
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

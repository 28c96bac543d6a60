"""Helpers to run the app on a local Serve instance (the default app, or small per-test apps
deployed next to it), shared by tests and benchmarks."""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
REQUEST = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_app_args() -> dict[str, Any]:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    return copy.deepcopy(config["applications"][0]["args"])


def wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=10)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"app did not become ready: {last}")


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


def replica_infos(app: str, count: int, timeout_s: float = 60) -> dict[str, dict[str, Any]]:
    """`SDXLPipeline.replica_info()` of `count` distinct replicas, keyed by replica id.

    A handle call lands on whichever replica the router picks, so this asks until it has heard
    from `count` of them.
    """
    from ray import serve

    handle = serve.get_deployment_handle("SDXLPipeline", app_name=app)
    infos: dict[str, dict[str, Any]] = {}

    def heard_enough() -> bool:
        info = handle.replica_info.remote().result(timeout_s=30)
        infos[info["replica"]] = info
        return len(infos) >= count

    wait_for(heard_enough, timeout_s, what=f"{count} SDXLPipeline replicas of {app}")
    return infos

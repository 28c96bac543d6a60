"""The SDXLPipeline's watchdog end to end: when the step batcher's thread dies, the request it
held fails with a clear 503, `check_health` fails, and Serve replaces the replica, whose first
request succeeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.serve.harness import app_args, replica_actor_names, wait_for, wait_ready

APP = "watchdog"
REQUEST = {"model": "wd", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


def _end_the_batcher_thread(replica: Any) -> str:
    """Runs inside the replica actor (Ray's `__ray_call__`): the batcher's next UNet call raises
    SystemExit, which escapes every per-request handler and ends its thread: the fault the
    watchdog exists for, which no request can cause. Returns the batcher's health before."""
    pipeline = replica._replica_impl._user_callable_wrapper._callable

    def end_thread(members: object) -> None:
        raise SystemExit("injected: the step batcher's thread ends")

    health = pipeline._batcher.health()
    pipeline._batcher._step = end_thread
    return health or "healthy"


def test_a_dead_step_batcher_fails_the_health_check_and_serve_replaces_the_replica(
    ray_session: int, tiny_model_dir: Path
) -> None:
    import ray
    from ray import serve

    from deployments.app import build_app

    args = app_args([{"id": "wd", "source": str(tiny_model_dir)}])
    args["pipeline_deployment"].update(
        health_check_period_s=1, health_check_timeout_s=10, graceful_shutdown_timeout_s=1
    )
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    url = f"http://127.0.0.1:{ray_session}/{APP}"
    try:
        wait_ready(url)
        with httpx.Client(timeout=120) as http:
            assert http.post(f"{url}/v1/generate", json={**REQUEST, "seed": 1}).status_code == 200
            (before,) = replica_actor_names(APP, "SDXLPipeline")
            replica = ray.get_actor(before, namespace="serve")
            assert ray.get(replica.__ray_call__.remote(_end_the_batcher_thread)) == "healthy"

            failed = http.post(f"{url}/v1/generate", json={**REQUEST, "seed": 2})
            assert failed.status_code == 503, failed.text
            assert failed.json()["error"]["code"] == "unavailable"

            def replaced() -> bool:
                names = replica_actor_names(APP, "SDXLPipeline")
                return len(names) == 1 and before not in names  # the old one stopped

            wait_for(replaced, timeout_s=120, what="Serve to replace the unhealthy replica")

            def served() -> bool:
                response = http.post(f"{url}/v1/generate", json={**REQUEST, "seed": 3})
                return response.status_code == 200

            wait_for(served, timeout_s=120, what="the new replica to serve")
    finally:
        serve.delete(APP)

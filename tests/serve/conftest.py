"""One single-node Ray cluster and one Serve instance for the `tests/serve` package, serving the
checked-in default app (serve_config.yaml) on a free loopback port; tests talk real HTTP to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve.harness import default_app_args, free_port, wait_ready

APP_NAME = "diffusion"


@pytest.fixture(scope="package")
def ray_session() -> Iterator[int]:
    import ray
    from ray import serve

    ray.init(
        num_cpus=8,
        include_dashboard=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}},
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="package")
def app_url(ray_session: int, tiny_model_dir: Path) -> str:
    """The default app, with one fixed SDXLPipeline replica so per-job stats are on one replica."""
    from ray import serve

    from deployments.app import build_app

    args = default_app_args()
    args["pipeline_deployment"].pop("autoscaling")
    args["pipeline_deployment"]["num_replicas"] = 1
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{ray_session}"
    wait_ready(url)
    return url


@pytest.fixture()
def client(app_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app_url, timeout=120) as http:
        yield http

"""A real multi-node Ray cluster on this machine: `ray.cluster_utils.Cluster` with a CPU head and
two worker nodes that each offer one logical GPU, so `num_gpus=1` replicas land one per worker.

Each node runs its own raylet and object store, so weights a replica reads on a worker node travel
between object stores exactly as they would between machines. Package-scoped: the cluster is shut
down before `tests/serve` starts its single-node Ray in the same process.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.s3_server import S3Server
from tests.serve.harness import REQUEST, app_args, free_port, replica_infos, wait_for

HEAD_RESOURCE = "head"  # pins the Router, ClipEncoder and ModelCache to the head node
STORE_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class LocalCluster:
    http_port: int
    head_node_id: str
    worker_node_ids: tuple[str, ...]


@pytest.fixture(scope="package")
def local_cluster() -> Iterator[LocalCluster]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "num_gpus": 0,
            "resources": {HEAD_RESOURCE: 1},
            "object_store_memory": STORE_BYTES,
            "include_dashboard": False,
        },
    )
    workers = [
        cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=STORE_BYTES) for _ in range(2)
    ]
    try:
        cluster.wait_for_nodes()
        ray.init(
            address=cluster.address,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}},
            log_to_driver=False,
        )
        port = free_port()
        # One proxy: every node of this "cluster" shares 127.0.0.1, so they cannot all bind `port`.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield LocalCluster(
            http_port=port,
            head_node_id=cluster.head_node.node_id,
            worker_node_ids=tuple(node.node_id for node in workers),
        )
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@contextmanager
def tiny_app_from_s3(
    cluster: LocalCluster,
    s3_server: S3Server,
    tiny_model_dir: Path,
    app: str,
    model: dict[str, Any],
    pipeline: dict[str, Any],
) -> Iterator[httpx.Client]:
    """Deploy `app` serving the tiny model from its own `s3://models/<app>` prefix (so S3 GETs of
    other tests never mix in), SDXLPipeline with `pipeline` options on the GPU workers and every
    other deployment on the head; yields an HTTP client for the app's route, `/<app>`."""
    from ray import serve

    from deployments.app import build_app

    url = f"s3://models/{app}"
    s3_server.upload_folder(tiny_model_dir, url)
    options = s3_server.storage_options(
        key="testing", secret="testing", client_kwargs={"region_name": "us-east-1"}
    )
    args = app_args([{"source": url, "storage_options": options, **model}])
    args["pipeline_deployment"].update(num_gpus=1, num_cpus=0.5, max_ongoing_requests=1)
    args["pipeline_deployment"].update(pipeline)
    for name in ("router_deployment", "encoder_deployment", "cache_deployment"):
        args[name]["resources"] = {HEAD_RESOURCE: 0.01}
    s3_server.clear_log()
    serve.run(build_app(args), name=app, route_prefix=f"/{app}")
    base = f"http://127.0.0.1:{cluster.http_port}/{app}"
    try:
        with httpx.Client(base_url=base, timeout=180) as http:
            yield http
    finally:
        serve.delete(app)


def generate_over_http(http: httpx.Client, model: str, seeds: range) -> None:
    """Concurrent requests over HTTP: with one slot per replica, every replica gets work."""

    def one(seed: int) -> dict[str, Any]:
        response = http.post("/v1/generate", json={**REQUEST, "model": model, "seed": seed})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=4) as pool:
        for seed, body in zip(seeds, pool.map(one, seeds), strict=True):
            assert body["images"][0]["seed"] == seed and body["images"][0]["b64"]


def serve_until_every_replica_built(
    http: httpx.Client, app: str, model: str, seeds: range, replicas: int = 2
) -> dict[str, dict[str, Any]]:
    """Bursts of requests until `replicas` SDXLPipeline replicas have built `model`; their
    `replica_info()`s. Replicas are asked between bursts, while idle."""

    def all_built() -> dict[str, dict[str, Any]] | None:
        generate_over_http(http, model, seeds)
        infos = replica_infos(app, count=replicas)
        return infos if all(info["models_built"] == [model] for info in infos.values()) else None

    return wait_for(all_built, timeout_s=240, what=f"{replicas} replicas to build {model}")

"""Weights across nodes: ModelCache on the head, SDXLPipeline replicas on two GPU workers.

The model lives on a loopback S3 server, so every read of the source is an HTTP GET the test can
count. A replica on a worker node gets the weights from the head's object store through Ray; the
source is read once for the whole cluster, and once more after the cache replica dies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import (
    LocalCluster,
    generate_over_http,
    serve_until_every_replica_built,
    tiny_app_from_s3,
)
from tests.s3_server import S3Server
from tests.serve.harness import (
    cache_status,
    kill_replica,
    replica_actor_names,
    wait_for,
)

APP = "multinode"
MODEL = "mn-tiny"
URL = f"s3://models/{APP}"


@pytest.fixture(scope="module")
def cluster_app(
    local_cluster: LocalCluster, s3_server: S3Server, tiny_model_dir: Path
) -> Iterator[httpx.Client]:
    model = {"id": MODEL, "preload": False}
    with tiny_app_from_s3(
        local_cluster, s3_server, tiny_model_dir, APP, model, pipeline={"num_replicas": 2}
    ) as http:
        yield http


def source_reads(s3_server: S3Server) -> Counter[str]:
    return Counter(s3_server.object_gets(URL))


def test_replicas_on_two_nodes_share_one_read_of_the_source(
    cluster_app: httpx.Client, local_cluster: LocalCluster, s3_server: S3Server
) -> None:
    import ray
    from ray import serve

    infos = serve_until_every_replica_built(cluster_app, APP, MODEL, range(8))

    # One replica on each GPU worker; the cache on the head.
    assert sorted(info["node_id"] for info in infos.values()) == sorted(
        local_cluster.worker_node_ids
    )
    reads = source_reads(s3_server)
    assert reads and max(reads.values()) == 1, reads  # every file read once, for all nodes
    assert any(path.endswith("unet/diffusion_pytorch_model.safetensors") for path in reads)

    # The UNet's object is in the head's store (the cache's copy) and in each worker's store.
    cache = serve.get_deployment_handle("ModelCache", app_name=APP)
    refs = cache.get.remote(MODEL).result(timeout_s=30)
    locations = ray.experimental.get_object_locations([refs["unet"]])[refs["unet"]]
    expected = {local_cluster.head_node_id, *local_cluster.worker_node_ids}
    assert set(locations["node_ids"]) == expected
    assert cache_status(APP)[MODEL]["loads"] == 1


def test_replicas_start_and_serve_after_the_cache_replica_dies(
    cluster_app: httpx.Client, local_cluster: LocalCluster, s3_server: S3Server
) -> None:
    import ray

    serve_until_every_replica_built(cluster_app, APP, MODEL, range(100, 104))
    before = source_reads(s3_server)
    assert before and max(before.values()) == 1, before

    killed_cache = kill_replica(APP, "ModelCache")
    wait_for(
        lambda: replica_actor_names(APP, "ModelCache") not in ([], [killed_cache]),
        what="a new ModelCache replica",
    )
    # Replicas already running keep serving from the modules they built ...
    generate_over_http(cluster_app, MODEL, range(200, 204))

    # ... and replicas that start now, on both workers, load through the new cache.
    old = set(replica_actor_names(APP, "SDXLPipeline"))
    for name in old:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    wait_for(
        lambda: len(set(replica_actor_names(APP, "SDXLPipeline")) - old) == 2,
        what="two new SDXLPipeline replicas",
    )
    infos = serve_until_every_replica_built(cluster_app, APP, MODEL, range(300, 304))
    assert sorted(info["node_id"] for info in infos.values()) == sorted(
        local_cluster.worker_node_ids
    )
    after = source_reads(s3_server)
    assert set(after) == set(before)
    assert max(after.values()) == 2 and min(after.values()) == 2, after  # reloaded exactly once
    status = cache_status(APP)[MODEL]
    assert status["state"] == "cached" and status["loads"] == 1  # the new cache's one read

"""Autoscaling across nodes: load on one SDXLPipeline replica brings up a second one on the other
GPU worker, which starts from the object store: the source is still read once for the cluster."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import LocalCluster, serve_until_every_replica_built, tiny_app_from_s3
from tests.s3_server import S3Server
from tests.serve.harness import REQUEST, replica_actor_names, replica_infos, wait_for

APP = "autoscale"
MODEL = "as-tiny"
URL = f"s3://models/{APP}"


@pytest.fixture(scope="module")
def autoscaled(
    local_cluster: LocalCluster, s3_server: S3Server, tiny_model_dir: Path
) -> Iterator[httpx.Client]:
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 600,
    }
    with tiny_app_from_s3(
        local_cluster,
        s3_server,
        tiny_model_dir,
        APP,
        model={"id": MODEL, "preload": True},
        pipeline={"num_replicas": None, "autoscaling": autoscaling},
    ) as http:
        yield http


def test_load_scales_out_to_the_other_node_without_rereading_the_source(
    autoscaled: httpx.Client, local_cluster: LocalCluster, s3_server: S3Server
) -> None:
    http = autoscaled
    assert http.post("/v1/generate", json={**REQUEST, "model": MODEL, "seed": 0}).status_code == 200
    (first,) = replica_infos(APP, count=1).values()
    reads = Counter(s3_server.object_gets(URL))
    assert reads and max(reads.values()) == 1, reads

    # Keep four requests in flight (one slot per replica) until the autoscaler adds a replica.
    stop = threading.Event()

    def load(worker: int) -> Counter[int]:
        statuses, seed = Counter[int](), worker * 1000
        while not stop.is_set():
            seed += 1
            body = {**REQUEST, "model": MODEL, "seed": seed, "steps": 10}
            statuses[http.post("/v1/generate", json=body).status_code] += 1
        return statuses

    with ThreadPoolExecutor(max_workers=4) as pool:
        loads = [pool.submit(load, worker) for worker in range(4)]
        try:
            wait_for(
                lambda: len(replica_actor_names(APP, "SDXLPipeline")) == 2,
                timeout_s=120,
                what="the autoscaler to add a second SDXLPipeline replica",
            )
        finally:
            stop.set()
        statuses = sum((future.result() for future in loads), Counter[int]())
    assert statuses and set(statuses) == {200}, statuses  # the queue absorbed the burst

    infos = serve_until_every_replica_built(http, APP, MODEL, range(100, 104))
    (added,) = [info for info in infos.values() if info["replica"] != first["replica"]]
    assert {first["node_id"], added["node_id"]} == set(local_cluster.worker_node_ids)
    assert Counter(s3_server.object_gets(URL)) == reads  # the new node read nothing from S3

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

from tests.cluster.conftest import LocalCluster, tiny_app_from_s3
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


def both_serving() -> dict[str, dict] | None:
    infos = replica_infos(APP, count=2)
    return infos if all(info["models_built"] == [MODEL] for info in infos.values()) else None


def test_load_scales_out_to_the_other_node_without_rereading_the_source(
    autoscaled: httpx.Client, local_cluster: LocalCluster, s3_server: S3Server
) -> None:
    http = autoscaled
    assert http.post("/v1/generate", json={**REQUEST, "model": MODEL, "seed": 0}).status_code == 200
    (first,) = replica_infos(APP, count=1).values()
    reads = Counter(s3_server.object_gets(URL))
    assert reads and max(reads.values()) == 1, reads

    # Keep four requests in flight (one slot per replica) until the autoscaler adds a replica.
    stop, statuses = threading.Event(), Counter[int]()

    def load(worker: int) -> None:
        seed = worker * 1000
        while not stop.is_set():
            seed += 1
            body = {**REQUEST, "model": MODEL, "seed": seed, "steps": 10}
            statuses[http.post("/v1/generate", json=body).status_code] += 1

    with ThreadPoolExecutor(max_workers=4) as pool:
        for worker in range(4):
            pool.submit(load, worker)
        try:
            wait_for(
                lambda: len(replica_actor_names(APP, "SDXLPipeline")) == 2,
                timeout_s=120,
                what="the autoscaler to add a second SDXLPipeline replica",
            )
            infos = wait_for(both_serving, timeout_s=120, what="the new replica to serve")
        finally:
            stop.set()

    assert set(statuses) == {200}, statuses  # the queue absorbed the burst: no errors
    (added,) = [info for info in infos.values() if info["replica"] != first["replica"]]
    assert {first["node_id"], added["node_id"]} == set(local_cluster.worker_node_ids)
    assert Counter(s3_server.object_gets(URL)) == reads  # the new node read nothing from S3

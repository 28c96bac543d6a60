"""N replicas on one node hold one copy of the weights.

Two CPU SDXLPipeline replicas build their engine from the same object-store refs. The weights are
mapped from the node's shared-memory store, so each replica's *private* memory (USS) grows by a
small fraction of the model while its resident set (RSS) grows by about the model: the pages are
there, and they are shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest

from tests.serve.harness import (
    app_args,
    assert_image,
    deploy,
    generate,
    replica_infos,
    wait_for,
)

APP = "zero-copy"
ENGINE_FOLDERS = ("unet", "vae", "taesd")  # what SDXLPipeline builds; the text encoders are not
# A private copy would be 100 %; what a replica does own is the first request's allocations on
# the model and its modules' Python objects (measured 61-83 MB for the 825 MB engine).
MAX_PRIVATE_SHARE = 0.12


@pytest.fixture(scope="module")
def small_app(ray_session: int) -> Iterator[tuple[Any, int]]:
    """The `small` preset (~1 GB) and `tiny`, served by two replicas that take one request each
    at a time."""
    from ray import serve

    from shared.weights.builtin import resolve_builtin

    folder = resolve_builtin("small")
    engine_bytes = sum(
        path.stat().st_size
        for name in ENGINE_FOLDERS
        for path in (folder / name).glob("*.safetensors")
    )
    models = [
        {"id": "tiny", "source": "tiny", "preload": True},  # each replica starts warm with it
        # Not preloaded, so each replica builds it on first use, between the two readings.
        {"id": "small", "source": "small", "preload": False},
    ]
    args = app_args(models, pipeline_replicas=2)
    args["pipeline_deployment"].update(max_ongoing_requests=1)
    router = deploy(APP, args)
    try:
        yield router, engine_bytes
    finally:
        serve.delete(APP)


def memory(pid: int) -> tuple[int, int]:
    info = psutil.Process(pid).memory_full_info()
    return info.uss, info.rss


def serve_until_both_built(router: Any, model: str, expected: list[str]) -> None:
    """Concurrent requests, one slot per replica, until both replicas have built `model`."""

    def both_built() -> bool:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda seed: generate(router, model, seed), range(4)))
        for seed, result in enumerate(results):
            assert_image(result, seed)
        infos = replica_infos(APP, count=2)
        return all(info["models_built"] == expected for info in infos.values())

    wait_for(both_built, timeout_s=300, what=f"both replicas to build {model}")


def test_two_replicas_on_one_node_share_one_copy(small_app: tuple[Any, int]) -> None:
    router, engine_bytes = small_app
    # A first model on each replica pays the one-off costs (lazy imports, the first request's
    # allocations), so the growth measured next is the second model's weights alone.
    serve_until_both_built(router, "tiny", expected=["tiny"])
    before_build = replica_infos(APP, count=2)
    assert len({info["node_id"] for info in before_build.values()}) == 1
    before = {replica: memory(info["pid"]) for replica, info in before_build.items()}

    serve_until_both_built(router, "small", expected=["small", "tiny"])

    after = {replica: memory(info["pid"]) for replica, info in before_build.items()}
    for replica, (uss_before, rss_before) in before.items():
        uss_after, rss_after = after[replica]
        private, resident = uss_after - uss_before, rss_after - rss_before
        report = (
            f"replica {replica}: private +{private / 1e6:.0f} MB, resident +{resident / 1e6:.0f} "
            f"MB, engine weights {engine_bytes / 1e6:.0f} MB"
        )
        print(report)
        # The weights are really mapped and used by this process ...
        assert resident >= 0.8 * engine_bytes, report
        # ... and they are not this process's own copy.
        assert private <= MAX_PRIVATE_SHARE * engine_bytes, report

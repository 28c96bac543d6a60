"""Throughput under concurrency: step-level batching on vs off vs a peer app, through HTTP.

Closed loop: C clients each send the next request as soon as the last one answered, for a fixed
time, with a distinct prompt per request (so the embedding cache does not flatter). Our app is
the default app (tiny model, CPU) with one SDXLPipeline replica, batching on and then off; the
peer is Ray Serve's documented Stable Diffusion example shape (`benchmarks/peer_app.py`) with one
model replica at `max_ongoing_requests=1`, as a careful user sets it, and once more at Serve's
default to report how many of its requests fail. Reports img/s, p50/p95 latency and time to
first step (our streams' first `step` event; the peer streams nothing, so its first step is its
whole latency), and writes results/throughput.{json,png}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, summarize

STEPS = 8
PEER_DEFAULT_CONCURRENCY = 4


def start_serve() -> int:
    import ray
    from ray import serve

    from tests.serve.harness import free_port

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def deploy_ours(batching: bool) -> None:
    from ray import serve

    from deployments.app import build_app
    from tests.serve.harness import default_app_args

    args = default_app_args()
    args["pipeline_deployment"].pop("autoscaling")
    args["pipeline_deployment"]["num_replicas"] = 1
    args["batching"] = {**args.get("batching", {}), "enabled": batching}
    serve.run(build_app(args), name="bench", route_prefix="/")


def deploy_peer(model_dir: Path, max_ongoing_requests: int | None) -> None:
    from ray import serve

    from benchmarks.peer_app import build_peer

    serve.run(build_peer(str(model_dir), max_ongoing_requests), name="bench", route_prefix="/")


def ours_request(base: str, side: int) -> Callable[[Any, int], tuple[float, float, bool]]:
    """One streamed request: (time to first step, latency, ok)."""

    def send(http: Any, n: int) -> tuple[float, float, bool]:
        body = {
            "model": "tiny",
            "prompt": f"a photo of object number {n}",
            "width": side,
            "height": side,
            "steps": STEPS,
            "seed": n,
            "stream": True,
        }
        started = time.perf_counter()
        first = None
        ok = False
        with http.stream("POST", f"{base}/v1/generate", json=body) as response:
            for line in response.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if event["event"] == "step" and first is None:
                    first = time.perf_counter() - started
                ok = event["event"] == "result"
        latency = time.perf_counter() - started
        return (
            (first if first is not None else latency),
            latency,
            ok and response.status_code == 200,
        )

    return send


def peer_request(base: str, side: int) -> Callable[[Any, int], tuple[float, float, bool]]:
    def send(http: Any, n: int) -> tuple[float, float, bool]:
        started = time.perf_counter()
        params = {"prompt": f"a photo of object number {n}", "img_size": side, "steps": STEPS}
        response = http.get(f"{base}/imagine", params=params)
        latency = time.perf_counter() - started
        return latency, latency, response.status_code == 200

    return send


def closed_loop(
    send: Callable[[Any, int], tuple[float, float, bool]], concurrency: int, seconds: float
) -> dict[str, float]:
    import httpx

    counter = itertools.count()
    records: list[tuple[float, float, bool]] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while time.perf_counter() < stop_at:
                try:
                    record = send(http, next(counter))
                except httpx.HTTPError:
                    record = (0.0, 0.0, False)
                with lock:
                    records.append(record)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    good = [r for r in records if r[2]]
    latency = summarize([r[1] * 1000 for r in good]) if good else {}
    first = summarize([r[0] * 1000 for r in good]) if good else {}
    return {
        "img_per_s": len(good) / elapsed,
        "requests": len(records),
        "failed": len(records) - len(good),
        "failure_rate": (len(records) - len(good)) / max(1, len(records)),
        "p50_ms": latency.get("p50", float("nan")),
        "p95_ms": latency.get("p95", float("nan")),
        "first_step_p50_ms": first.get("p50", float("nan")),
    }


def run_app(
    name: str,
    deploy: Callable[[], None],
    request: Callable[[str, int], Callable[[Any, int], tuple[float, float, bool]]],
    base: str,
    sides: list[int],
    concurrencies: list[int],
    seconds: float,
) -> dict[str, dict[str, float]]:
    from ray import serve

    from tests.serve.harness import wait_for

    deploy()
    rows: dict[str, dict[str, float]] = {}
    try:
        for side in sides:
            send = request(base, side)
            wait_for(lambda send=send: send(_client(), 0)[2], 120, f"{name} to answer")
            closed_loop(send, 2, min(3.0, seconds))  # warm-up, excluded
            for concurrency in concurrencies:
                row = closed_loop(send, concurrency, seconds)
                rows[f"{side}px c{concurrency}"] = row
                print(
                    f"{name:<16}{side:>5}px c{concurrency:<3}{row['img_per_s']:>8.2f} img/s"
                    f"{row['p50_ms']:>9.0f} p50{row['p95_ms']:>9.0f} p95"
                    f"{row['first_step_p50_ms']:>9.0f} first{row['failed']:>4.0f} failed"
                )
    finally:
        serve.delete("bench")
    return rows


_http_client: Any = None


def _client() -> Any:
    import httpx

    global _http_client
    if _http_client is None:
        _http_client = httpx.Client(timeout=300)
    return _http_client


def plot(path: Path, results: dict[str, dict[str, dict[str, float]]], side: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for app, rows in results.items():
        points = [
            (int(key.split(" c")[1]), row["img_per_s"])
            for key, row in rows.items()
            if key.startswith(f"{side}px")
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=app)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images / s")
    ax.set_title(f"throughput, tiny SDXL {side}x{side}, {STEPS} steps, 2-core CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    parser.add_argument("--smoke", action="store_true", help="64 px, c1/c2, 1 s each")
    args = parser.parse_args()
    sides = [64] if args.smoke else [64, 256]
    concurrencies = [1, 2] if args.smoke else [1, 2, 4, 8, 16]
    seconds = 1.0 if args.smoke else args.seconds

    from benchmarks.common import machine_info
    from shared.weights.builtin import resolve_builtin

    model_dir = resolve_builtin("tiny")
    base = f"http://127.0.0.1:{start_serve()}"
    results = {
        "batching on": run_app(
            "batching on", lambda: deploy_ours(True), ours_request, base, sides,
            concurrencies, seconds,
        ),
        "batching off": run_app(
            "batching off", lambda: deploy_ours(False), ours_request, base, sides,
            concurrencies, seconds,
        ),
        "peer (Ray SD example)": run_app(
            "peer", lambda: deploy_peer(model_dir, 1), peer_request, base, sides,
            concurrencies, seconds,
        ),
    }  # fmt: skip
    at_defaults = run_app(
        "peer, defaults",
        lambda: deploy_peer(model_dir, None),
        peer_request,
        base,
        sides[:1],
        [PEER_DEFAULT_CONCURRENCY],
        seconds,
    )
    ratios = {
        key: {
            "vs_batching_off": row["img_per_s"]
            / max(1e-9, results["batching off"][key]["img_per_s"]),
            "vs_peer": row["img_per_s"]
            / max(1e-9, results["peer (Ray SD example)"][key]["img_per_s"]),
            "p50_vs_batching_off": row["p50_ms"] / results["batching off"][key]["p50_ms"],
        }
        for key, row in results["batching on"].items()
    }
    print("\nbatching on, img/s ratios:")
    for key, ratio in ratios.items():
        print(
            f"  {key:<12} x{ratio['vs_batching_off']:.2f} vs off, x{ratio['vs_peer']:.2f} vs "
            f"peer, p50 x{ratio['p50_vs_batching_off']:.2f} vs off"
        )
    name = "throughput_smoke" if args.smoke else "throughput"
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "config": {"steps": STEPS, "sides": sides, "concurrency": concurrencies,
                   "seconds": seconds, "pipeline_replicas": 1},
        "machine": machine_info(),
        "results": results,
        "ratios": ratios,
        "peer_at_serve_defaults": at_defaults,
    }  # fmt: skip
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    plot(path.with_suffix(".png"), results, sides[0])
    print(f"saved {path} and {path.with_suffix('.png')}")

    from ray import serve

    serve.shutdown()


if __name__ == "__main__":
    main()

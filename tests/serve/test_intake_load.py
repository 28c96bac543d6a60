"""The intake under load on the default app: memory stays flat through a thousand hostile and large
requests and a thousand ordinary ones, and sixteen worst-case decodes at once neither stall the
Router's event loop nor queue beyond the decode pool (a 429 `intake_busy` instead)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

from tests.hostile.corpus import image_cases
from tests.serve.conftest import APP_NAME

BASE = {"model": "tiny", "prompt": "a red fox", "steps": 2, "width": 64, "height": 64, "seed": 3}
RSS_GROWTH_LIMIT = 64 * 2**20
PROCESSES = {
    "Router": f"ServeReplica:{APP_NAME}:Router",
    "ClipEncoder": f"ServeReplica:{APP_NAME}:ClipEncoder",
    "proxy": "ProxyActor",
}


def rss() -> dict[str, int]:
    """Resident bytes of the Router and ClipEncoder replicas and Serve's proxy, by the titles
    Ray gives their worker processes."""
    found = dict.fromkeys(PROCESSES, 0)
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        for name, title in PROCESSES.items():
            if title in cmdline:
                found[name] += process.memory_info().rss
    assert all(found.values()), found
    return found


def _png(side: int, seed: int) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def _post_json(client: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _hostile_and_large(client: httpx.Client) -> list[Callable[[], httpx.Response]]:
    """One of each kind of heavy request; the load cycles through them."""
    large = _png(512, 1)  # 786 KB of noise: incompressible
    large_b64 = base64.b64encode(large).decode()
    refused = [case.data for case in image_cases() if case.status != 200]
    deep = b'{"model": "tiny", "prompt": "x", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    calls: list[Callable[[], httpx.Response]] = [
        lambda: _post_json(client, "/v1/generate", {**BASE, "init_image": large_b64}),
        lambda: _post_json(
            client,
            "/v1/embeddings",
            {"model": "tiny", "input": ["a fox", "data:image/png;base64," + large_b64]},
        ),
        lambda: client.post(
            "/v1/images/edits",
            files={"image": ("a.png", large, "image/png")},
            data={"model": "tiny", "prompt": "x", "steps": "1", "size": "256x256"},
        ),
        lambda: client.post(
            "/v1/generate", content=deep, headers={"content-type": "application/json"}
        ),
        lambda: _post_json(
            client,
            "/v1/generate/validate",
            {
                **BASE,
                "image_prompt": large_b64,
                "controlnet": [{"id": "tiny-canny", "image": large_b64}],
            },
        ),
    ]
    for data in refused:
        calls.append(lambda d=data: _post_json(client, "/v1/generate", {**BASE, "init_image": d}))
    return calls


def _run(calls: list[Callable[[], httpx.Response]], count: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def one(call: Callable[[], httpx.Response]) -> None:
        status = call().status_code
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, itertools.islice(itertools.cycle(calls), count)))
    return statuses


def test_memory_stays_flat_through_hostile_large_and_ordinary_requests(
    client: httpx.Client,
) -> None:
    prompts = ["a red fox", "a blue heron", "a green frog", "a grey wolf"]
    ordinary = [
        lambda p=prompt: _post_json(client, "/v1/generate", {**BASE, "prompt": p})
        for prompt in prompts
    ]
    heavy = _hostile_and_large(client)
    # Warm-up: a few ordinary requests and each heavy kind twice. The first of each kind pages
    # in code and libraries (libjpeg, libwebp, OpenCV's canny, the multipart parser) once; that
    # is resident memory, but not a climb.
    _run(ordinary, 8)
    _run(heavy, 2 * len(heavy))
    before = rss()
    statuses = _run(heavy, 1000)
    assert 500 not in statuses and sum(statuses.values()) == 1000, statuses
    middle = rss()
    statuses = _run(ordinary, 1000)
    assert statuses == {200: 1000}, statuses
    after = rss()
    growth = {name: after[name] - before[name] for name in before}
    print(
        "RSS MB before / after 1000 hostile+large / after 1000 ordinary:",
        {name: (before[n] >> 20, middle[n] >> 20, after[n] >> 20) for n, name in
         zip(before, before, strict=True)},
    )  # fmt: skip
    assert all(grown <= RSS_GROWTH_LIMIT for grown in growth.values()), growth


def _worst_case_jpeg() -> str:
    """A valid image as costly to decode as the caps allow, in a small body: 4096 x 4096 (the
    pixel cap), progressive (Pillow writes 10 scans), 0.24 MB. Decoding and fitting it to 64 x 64
    takes about 0.35 s of CPU here."""
    side = 4096
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    channel = (ramp[None, :] * 0.5 + ramp[:, None] * 0.5).astype(np.uint8)
    image = Image.fromarray(np.stack([channel, channel.T, 255 - channel], axis=-1))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, progressive=True)
    return base64.b64encode(buffer.getvalue()).decode()


def test_sixteen_worst_case_decodes_stall_neither_probes_nor_small_requests(
    app_url: str,
) -> None:
    image = _worst_case_jpeg()
    body = json.dumps({**BASE, "init_image": image})
    done = threading.Event()
    health: list[float] = []
    small: list[float] = []

    def probe(path: str, payload: bytes | None, into: list[float], every_s: float) -> None:
        with httpx.Client(base_url=app_url, timeout=30) as probe_client:
            while not done.is_set():
                started = time.perf_counter()
                if payload is None:
                    response = probe_client.get(path)
                else:
                    response = probe_client.post(
                        path, content=payload, headers={"content-type": "application/json"}
                    )
                assert response.status_code == 200, response.text
                into.append(time.perf_counter() - started)
                time.sleep(every_s)

    # One client made up front: making sixteen at the burst's start costs this process (the
    # probes' own) ~20 ms of GIL each for their TLS contexts, which the probes would measure.
    heavy_client = httpx.Client(
        base_url=app_url, timeout=60, limits=httpx.Limits(max_connections=32)
    )

    def heavy(_: int) -> httpx.Response:
        return heavy_client.post(
            "/v1/generate/validate", content=body, headers={"content-type": "application/json"}
        )

    validate = json.dumps(BASE).encode()
    probes = [
        threading.Thread(target=probe, args=("/healthz", None, health, 0.02)),
        threading.Thread(target=probe, args=("/v1/generate/validate", validate, small, 0.1)),
    ]
    for thread in probes:
        thread.start()
    time.sleep(1.0)
    quiet = (len(health), len(small))
    with heavy_client, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(heavy, range(16)))
    done.set()
    for thread in probes:
        thread.join()
    statuses = [answer.status_code for answer in answers]
    busy = [answer for answer in answers if answer.status_code == 429]
    assert set(statuses) <= {200, 429}, [a.text[:200] for a in answers]
    assert statuses.count(200) >= 2, "the pool decodes while it refuses the rest"
    for answer in busy:
        assert answer.json()["error"]["code"] == "intake_busy"
        assert int(answer.headers["retry-after"]) >= 1
    loaded_health = sorted(health[quiet[0] :])
    loaded_small = sorted(small[quiet[1] :])

    def percentile(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(len(values) * q))]

    print(
        f"under 16 worst-case decodes: {statuses.count(200)} decoded, {len(busy)} refused; "
        f"/healthz p50 {percentile(loaded_health, 0.5) * 1000:.0f} ms, p90 "
        f"{percentile(loaded_health, 0.9) * 1000:.0f} ms, p99 "
        f"{percentile(loaded_health, 0.99) * 1000:.0f} ms ({len(loaded_health)} probes); small "
        f"validate p90 {percentile(loaded_small, 0.9) * 1000:.0f} ms, max "
        f"{loaded_small[-1] * 1000:.0f} ms"
    )
    # Measured on the 2-core machine with this client's 16 uploads on the same cores: quiet,
    # /healthz p50 10 ms, p90 22 ms, p99 28-60 ms and the small request's slowest 125 ms; late in
    # the full suite (other apps deployed on the same Ray), p50 23 ms, p90 59 ms, p99 169 ms,
    # small request p90 184 ms. The slowest probes come at the burst's arrival (16 bodies
    # through Serve's proxy at once), not during the decodes. The bounds below hold with that
    # noise and still catch the stall they guard against: before the decode pool and the caps,
    # six hostile decodes at once held /healthz to 0.7 s and a small request to 3.9 s.
    assert percentile(loaded_health, 0.9) < 0.1
    assert percentile(loaded_health, 0.99) < 0.3
    assert percentile(loaded_small, 0.9) < 0.3

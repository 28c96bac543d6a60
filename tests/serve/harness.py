"""Helpers to run the default app on a local Serve instance, shared by tests and benchmarks."""

from __future__ import annotations

import copy
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]


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

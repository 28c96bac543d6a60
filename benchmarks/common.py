"""Shared helpers of the benchmark scripts: percentiles, the results table, JSON + PNG output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def denoise_job(embeddings: Any, steps: int, guidance_scale: float = 5.0, seed: int = 1) -> Any:
    """A 64x64 one-image job, as the Router would hand it to SDXLPipeline."""
    from shared.api.jobs import DenoiseJob

    return DenoiseJob(
        id="bench",
        model="bench",
        embeddings=embeddings,
        width=64,
        height=64,
        steps=steps,
        guidance_scale=guidance_scale,
        seeds=[seed],
        created_at=time.time(),
    )


def machine_info() -> dict[str, Any]:
    """What a figure depends on: the commit, the library versions and the machine."""
    import os
    import subprocess
    from importlib import metadata

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    versions = {}
    for package in ("torch", "diffusers", "transformers", "ray", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "commit": commit,
        "versions": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
    }


def measure(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Milliseconds per call of `fn`, warm-up calls excluded."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def summarize(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def print_table(title: str, rows: dict[str, dict[str, float]], baseline: str) -> None:
    base = rows[baseline]["p50"]
    print(f"\n{title}")
    print(f"{'path':<28}{'p50 ms':>10}{'p95 ms':>10}{'x ' + baseline:>22}")
    for name, row in rows.items():
        print(f"{name:<28}{row['p50']:>10.1f}{row['p95']:>10.1f}{row['p50'] / base:>22.2f}")


def save(
    name: str,
    config: dict[str, Any],
    rows: dict[str, dict[str, float]],
    baseline: str,
    ylabel: str = "latency p50 (ms)",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write results/<name>.json (config echoed, percentiles, ratios, any `extra` sections) and
    results/<name>.png (p50 and p95 of `rows`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = rows[baseline]["p50"]
    payload = {
        "benchmark": name,
        "config": config,
        "machine": machine_info(),
        "baseline": baseline,
        "results": rows,
        "ratios_p50": {k: v["p50"] / base for k, v in rows.items()},
        **(extra or {}),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    _plot(RESULTS / f"{name}.png", name, rows, ylabel)
    return path


def _plot(path: Path, title: str, rows: dict[str, dict[str, float]], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [rows[n]["p50"] for n in names], color="#4C72B0", label="p50")
    ax.scatter(names, [rows[n]["p95"] for n in names], color="#DD8452", zorder=3, label="p95")
    values = [rows[n]["p50"] for n in names]
    if max(values) > 20 * min(values):
        ax.set_yscale("log")  # otherwise the fastest bars vanish next to the slowest
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

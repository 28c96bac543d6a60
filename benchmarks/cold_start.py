"""How fast does a new replica start, and what does a second one on the same node cost?

Every start runs in a fresh process (a Ray actor that has imported what a replica imports, as a
Serve replica has by the time it loads a model) and times, inside that process, how long until
(a) weights ready: every component built as a torch module, the way SDXLPipeline and ClipEncoder
build them, and (b) the first image: one prompt encoded and a 64x64 image made in 2 steps. The
weights come from

- the Ray object store (what ModelCache gives replicas: `ray.get` of its refs + zero-copy build),
- the local safetensors folder (`load_model` + build; the OS page cache is warm after run one),
- S3 on loopback (a moto server in this script's process; `load_model` over s3fs + build).

Memory: two replica processes on one node build the engine (UNet, VAE, TAESD) and make an image;
each one's growth in private (USS) and resident (RSS) memory, from the object-store refs vs each
reading the local folder.

    python benchmarks/cold_start.py            # the `small` preset (~0.9 GB), 5 runs per path
    python benchmarks/cold_start.py --smoke    # the `tiny` preset, a few runs, for CI
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import denoise_job, machine_info, save, summarize

EXTRA = {"taesd": "taesd"}
ENGINE_FOLDERS = ("unet", "vae", "taesd")
ENGINE_COMPONENTS = (*ENGINE_FOLDERS, "scheduler")
PROMPT = "a photo of a cat"

Components = dict[str, Any]


# A weights source as a replica process receives it: object-store refs, or (source, options).
Source = dict[str, Any] | tuple[str, dict[str, Any]]


def fetch(source: Source, names: tuple[str, ...] | None = None) -> Components:
    """What a replica gets its components from: `ray.get` of refs, or reading the source."""
    import ray

    from shared.config import ModelConfig
    from shared.weights.loader import load_model

    if isinstance(source, dict):
        refs = {n: r for n, r in source.items() if names is None or n in names}
        return dict(zip(refs, ray.get(list(refs.values())), strict=True))
    url, options = source
    config = ModelConfig(id="bench", source=url, storage_options=options)
    if names is None:
        return load_model(config, extra=EXTRA).components
    return load_model(config, [n for n in names if n not in EXTRA], extra=EXTRA).components


def replica_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Replica:
        """A fresh process that starts like an SDXLPipeline/ClipEncoder replica and times it."""

        def __init__(self) -> None:
            # What a replica has imported by the time it loads a model: the deployments, and
            # the engine stack their constructors import (diffusers' and transformers' model
            # classes load lazily, so touch them too).
            import diffusers
            import transformers

            import shared.engine.build  # noqa: F401

            for name in ("UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny"):
                getattr(diffusers, name)
            for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"):
                getattr(transformers, name)

        def memory(self) -> tuple[int, int]:
            import psutil

            info = psutil.Process().memory_full_info()
            return info.uss, info.rss

        def start(self, source: Source, embeddings: Any = None) -> dict[str, float]:
            """Fetch and build, then make the first image; milliseconds to each.

            With `embeddings` given, only the engine is built (what an SDXLPipeline replica
            holds); otherwise the text encoders too, and the prompt is encoded here.
            """
            import resource

            from shared.engine.build import build_engine, build_prompt_encoder

            marks = [(time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF))]

            def mark() -> None:
                marks.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)))

            names = ENGINE_COMPONENTS if embeddings is not None else None
            components = fetch(source, names)
            mark()
            encoder = build_prompt_encoder(components) if embeddings is None else None
            self.engine = build_engine(components, "float32", "cpu")
            mark()
            if encoder is not None:
                (embeddings,) = encoder.encode([(PROMPT, None)])
            self.engine.run(denoise_job(embeddings, steps=2), lambda event: None, lambda: False)
            mark()
            timings = {
                "weights ready": (marks[2][0] - marks[0][0]) * 1000,
                "first image": (marks[3][0] - marks[0][0]) * 1000,
            }
            # Where the time goes: wall, user and system CPU, and page faults of each stage.
            stages = ("fetch", "build", "first image")
            for stage, (a, b) in zip(stages, itertools.pairwise(marks), strict=True):
                timings[f"{stage}: wall ms"] = (b[0] - a[0]) * 1000
                timings[f"{stage}: user ms"] = (b[1].ru_utime - a[1].ru_utime) * 1000
                timings[f"{stage}: sys ms"] = (b[1].ru_stime - a[1].ru_stime) * 1000
                timings[f"{stage}: minor faults"] = float(b[1].ru_minflt - a[1].ru_minflt)
            return timings

    return Replica


def measure_starts(source: Source, runs: int, warmup: int) -> dict[str, list[float]]:
    """Start a fresh replica process per run (warm-up runs discarded); times from inside it."""
    import ray

    replica_cls = replica_class()
    samples: dict[str, list[float]] = {}
    for run in range(warmup + runs):
        replica = replica_cls.remote()
        try:
            ray.get(replica.memory.remote())  # constructed: the imports are done
            timings = ray.get(replica.start.remote(source))
        finally:
            ray.kill(replica)
        if run >= warmup:
            for phase, ms in timings.items():
                samples.setdefault(phase, []).append(ms)
    return samples


def put_in_object_store(model_dir: Path) -> dict[str, Any]:
    """`ray.put` once, as ModelCache does at load; replicas then only `ray.get` the refs."""
    import ray

    from shared.config import ModelConfig
    from shared.weights.loader import load_model

    weights = load_model(ModelConfig(id="bench", source=str(model_dir)), extra=EXTRA)
    return {name: ray.put(part) for name, part in weights.components.items()}


def start_s3(model_dir: Path) -> tuple[Any, str]:
    """A moto S3 server on 127.0.0.1 holding the model: the server and the model's URL."""
    from tests.s3_server import FAKE_CREDENTIALS, S3Server

    os.environ.update(FAKE_CREDENTIALS)
    server = S3Server()
    server.start()
    url = f"s3://models/{model_dir.name}"
    server.upload_folder(model_dir, url)
    return server, url


# ------------------------------------------------------------------------------ second replica


def replica_memory(refs: dict[str, Any], model_dir: Path) -> dict[str, dict[str, float]]:
    """Private/resident growth of two replica processes on this node that build the engine and
    make an image: from the object-store refs, and (baseline) each reading the local folder."""
    import ray

    from shared.engine.build import build_prompt_encoder

    (embeddings,) = build_prompt_encoder(fetch(refs)).encode([(PROMPT, None)])
    replica_cls = replica_class()
    results: dict[str, dict[str, float]] = {}
    sources: list[tuple[str, Source]] = [
        ("object store", refs),
        ("local folder", (str(model_dir), {})),
    ]
    for label, source in sources:
        replicas = [replica_cls.remote() for _ in range(2)]
        for index, replica in enumerate(replicas, start=1):
            uss, rss = ray.get(replica.memory.remote())
            ray.get(replica.start.remote(source, embeddings))
            uss_after, rss_after = ray.get(replica.memory.remote())
            results[f"{label}, replica {index}"] = {
                "private_mb": (uss_after - uss) / 1e6,
                "resident_mb": (rss_after - rss) / 1e6,
            }
        for replica in replicas:
            ray.kill(replica)
    return results


def print_spread(title: str, rows: dict[str, dict[str, float]], baseline: str) -> None:
    base = rows[baseline]["p50"]
    print(f"\n{title}")
    print(f"{'path':<24}{'p50 ms':>10}{'min-max ms':>18}{'x ' + baseline:>18}")
    for name, row in rows.items():
        spread = f"{row['min']:.0f}-{row['max']:.0f}"
        print(f"{name:<24}{row['p50']:>10.0f}{spread:>18}{row['p50'] / base:>18.2f}")


def print_stages(stages: dict[str, dict[str, float]]) -> None:
    """p50 of each stage's wall, user and system time and page faults, per path."""
    print("\nwhere a start's time goes (p50 per stage)")
    for path, values in stages.items():
        cells = ", ".join(f"{key} {value:.0f}" for key, value in values.items())
        print(f"  {path}: {cells}")


def print_memory(memory: dict[str, dict[str, float]], engine_bytes: int) -> None:
    print(f"\nreplica memory growth, engine weights {engine_bytes / 1e6:.0f} MB")
    print(f"{'replica':<28}{'private MB':>12}{'resident MB':>13}{'private/model':>15}")
    for name, row in memory.items():
        share = row["private_mb"] * 1e6 / engine_bytes
        print(f"{name:<28}{row['private_mb']:>12.0f}{row['resident_mb']:>13.0f}{share:>15.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default=None, help="built-in model (default: small; tiny)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 1 run, no warm-up")
    args = parser.parse_args()
    preset = args.preset or ("tiny" if args.smoke else "small")
    runs, warmup = (1, 0) if args.smoke else (args.runs, args.warmup)

    import ray

    from shared.weights.builtin import resolve_builtin

    model_dir = resolve_builtin(preset)
    nbytes = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    engine_bytes = sum(
        p.stat().st_size for name in ENGINE_FOLDERS for p in (model_dir / name).glob("*")
    )
    # The actors import the project by module name, as Serve replicas do.
    repo = str(Path(__file__).resolve().parents[1])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"}},
    )
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        refs = put_in_object_store(model_dir)
        samples["object store"] = measure_starts(refs, runs, warmup)
        samples["local folder"] = measure_starts((str(model_dir), {}), runs, warmup)
        server, url = start_s3(model_dir)
        try:
            # Credentials in the options: the replica processes started before they were set.
            options = server.storage_options(
                key="testing", secret="testing", client_kwargs={"region_name": "us-east-1"}
            )
            s3 = (url, options)
            samples["S3 (loopback moto)"] = measure_starts(s3, runs, warmup)
        finally:
            server.stop()
        memory = replica_memory(refs, model_dir)
    finally:
        ray.shutdown()

    phases = {
        phase: {path: summarize(by_phase[phase]) for path, by_phase in samples.items()}
        for phase in ("weights ready", "first image")
    }
    machine = machine_info()
    for phase, rows in phases.items():
        title = (
            f"replica start to {phase}, `{preset}` preset ({nbytes / 1e6:.0f} MB), "
            f"{machine['cpus']} CPUs ({machine['processor'] or machine['machine']})"
        )
        print_spread(title, rows, baseline="object store")
    stages = {
        path: {key: summarize(values)["p50"] for key, values in by_phase.items() if ":" in key}
        for path, by_phase in samples.items()
    }
    print_stages(stages)
    print_memory(memory, engine_bytes)

    name = "cold_start_smoke" if args.smoke else "cold_start"
    config = {
        "preset": preset,
        "model_bytes": nbytes,
        "engine_bytes": engine_bytes,
        "runs": runs,
        "warmup": warmup,
        "first_image": "64x64, 2 steps, 1 prompt",
    }
    extra = {
        "first_image": phases["first image"],
        "stages_p50": stages,
        "samples": samples,
        "replica_memory": memory,
    }
    path = save(
        name,
        config,
        phases["weights ready"],
        "object store",
        ylabel="time to weights ready p50 (ms)",
        extra=extra,
    )
    print(f"saved {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

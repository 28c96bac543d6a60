"""How fast does a new replica get its weights? Time from "nothing" to built torch modules
(UNet, VAE, both text encoders, preview decoder) when the weights come from

- the Ray object store (what ModelCache gives replicas: `ray.get` of its refs + zero-copy build),
- the local safetensors folder (`load_model` + build; the OS page cache is warm after run one),
- S3 on loopback (a moto server this script starts; `load_model` over s3fs + build).

    python benchmarks/cold_start.py            # the `small` preset (~0.9 GB), 5 runs per path
    python benchmarks/cold_start.py --smoke    # the `tiny` preset, a few runs, for CI
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import measure, print_table, save, summarize

EXTRA = {"taesd": "taesd"}


def build_all(components: dict[str, Any]) -> list[Any]:
    """Every component with tensors as a module, as SDXLPipeline and ClipEncoder build them."""
    from shared.weights import build_module

    return [build_module(part) for part in components.values() if part.tensors]


def from_object_store(model_dir: Path):
    """ray.put once (what ModelCache does at load), then time what a new replica does."""
    import ray

    from shared.config import ModelConfig
    from shared.weights import load_model

    weights = load_model(ModelConfig(id="bench", source=str(model_dir)), extra=EXTRA)
    refs = {name: ray.put(part) for name, part in weights.components.items()}
    del weights

    def run() -> None:
        build_all(dict(zip(refs, ray.get(list(refs.values())), strict=True)))

    return run, refs


def from_folder(model_dir: Path):
    from shared.config import ModelConfig
    from shared.weights import load_model

    config = ModelConfig(id="bench", source=str(model_dir))

    def run() -> None:
        build_all(load_model(config, extra=EXTRA).components)

    return run


def from_s3(model_dir: Path):
    """A moto S3 server on 127.0.0.1 holding the model: the timed function and the server."""
    from shared.config import ModelConfig
    from shared.weights import load_model
    from tests.s3_server import FAKE_CREDENTIALS, S3Server

    os.environ.update(FAKE_CREDENTIALS)
    server = S3Server()
    server.start()
    url = f"s3://models/{model_dir.name}"
    server.upload_folder(model_dir, url)
    config = ModelConfig(id="bench", source=url, storage_options=server.storage_options())

    def run() -> None:
        build_all(load_model(config, extra=EXTRA).components)

    return run, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default=None, help="built-in model (default: small; tiny)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 3 runs, 1 warm-up")
    args = parser.parse_args()
    preset = args.preset or ("tiny" if args.smoke else "small")
    runs, warmup = (3, 1) if args.smoke else (args.runs, args.warmup)

    import ray

    from shared.tiny import resolve_builtin

    model_dir = resolve_builtin(preset)
    nbytes = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows: dict[str, dict[str, float]] = {}
    try:
        store_run, _refs = from_object_store(model_dir)
        rows["object store"] = summarize(measure(store_run, runs, warmup))
        rows["local folder"] = summarize(measure(from_folder(model_dir), runs, warmup))
        s3_run, server = from_s3(model_dir)
        try:
            rows["S3 (loopback moto)"] = summarize(measure(s3_run, runs, warmup))
        finally:
            server.stop()
    finally:
        ray.shutdown()

    title = f"weights ready (built modules), `{preset}` preset ({nbytes / 1e6:.0f} MB), CPU"
    print_table(title, rows, baseline="object store")
    name = "cold_start_smoke" if args.smoke else "cold_start"
    config = {"preset": preset, "model_bytes": nbytes, "runs": runs, "warmup": warmup}
    path = save(name, config, rows, "object store", ylabel="time to weights ready p50 (ms)")
    print(f"saved {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""What does serving cost? The same tiny-model request through HTTP, through a DeploymentHandle,
by calling the engine in-process, and with plain diffusers' pipeline — one run, one table.

    python benchmarks/overhead.py            # 30 timed runs per path
    python benchmarks/overhead.py --smoke    # a few runs, for CI
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import denoise_job, measure, print_table, save, summarize

REQUEST = {
    "model": "tiny",
    "prompt": "a photo of a cat",
    "width": 64,
    "height": 64,
    "steps": 8,
    "seed": 1,
    "guidance_scale": 5.0,
}


def in_process(model_dir: Path):
    """The engine and encoder called directly: the floor any serving path is compared with."""
    from shared.engine.prompts import PromptEncoder
    from shared.engine.sdxl import SDXLEngine

    encoder = PromptEncoder.from_pretrained_dir(model_dir)
    engine = SDXLEngine.from_pretrained_dir(model_dir)

    def call() -> None:
        (embeddings,) = encoder.encode([(REQUEST["prompt"], None)])
        job = denoise_job(embeddings, REQUEST["steps"], REQUEST["guidance_scale"], REQUEST["seed"])
        engine.run(job, lambda event: None, lambda: False)

    return call


def plain_diffusers(model_dir: Path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)

    def call() -> None:
        image = pipe(
            REQUEST["prompt"],
            width=64,
            height=64,
            num_inference_steps=REQUEST["steps"],
            guidance_scale=REQUEST["guidance_scale"],
            generator=torch.Generator().manual_seed(REQUEST["seed"]),
        ).images[0]
        image.save(os.devnull, format="PNG")

    return call


def served(port: int):
    import httpx
    from ray import serve

    from shared.api.schemas import GenerateRequest

    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    handle = serve.get_app_handle("diffusion")

    def via_http() -> None:
        response = http.post("/v1/generate", json=REQUEST)
        response.raise_for_status()

    def via_handle() -> None:
        handle.generate.remote(GenerateRequest(**REQUEST)).result()

    return via_http, via_handle


def start_app() -> int:
    import ray
    from ray import serve

    from deployments.app import build_app
    from tests.serve.harness import default_app_args, free_port

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = default_app_args()
    args["pipeline_deployment"].pop("autoscaling")
    args["pipeline_deployment"]["num_replicas"] = 1
    # The encoder's LRU would answer every repeat of the same prompt: measure real encoding.
    args.setdefault("encoder", {})["cache_entries"] = 0
    serve.run(build_app(args), name="diffusion", route_prefix="/")
    return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="3 runs, 1 warm-up")
    args = parser.parse_args()
    runs, warmup = (3, 1) if args.smoke else (args.runs, args.warmup)

    from shared.weights.builtin import resolve_builtin

    model_dir = resolve_builtin("tiny")
    port = start_app()
    via_http, via_handle = served(port)
    paths = {
        "in-process engine": in_process(model_dir),
        "plain diffusers": plain_diffusers(model_dir),
        "Serve handle": via_handle,
        "Serve HTTP": via_http,
    }
    rows = {name: summarize(measure(fn, runs, warmup)) for name, fn in paths.items()}
    print_table("64x64, 8 steps, tiny SDXL, CPU", rows, baseline="in-process engine")
    name = "overhead_smoke" if args.smoke else "overhead"
    path = save(name, {**REQUEST, "runs": runs, "warmup": warmup}, rows, "in-process engine")
    print(f"saved {path} and {path.with_suffix('.png')}")

    from ray import serve

    serve.shutdown()


if __name__ == "__main__":
    main()

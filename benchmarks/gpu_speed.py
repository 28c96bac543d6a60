"""Denoising speed without Ray: our engine (fast paths on and off, alone and step-batched) against
plain diffusers, one prompt per call and as a static batch of N prompts.

Every row runs on the same weights and the same prompt embeddings:

- ours, fast paths on / off: `SDXLEngine` built by `build_engine` from the loader's
  `ComponentWeights`, as a replica builds it, with `EngineConfig`'s fast paths (channels-last
  UNet, fused QKV) all on, as a GPU replica resolves them by default, and all off;
- diffusers: `StableDiffusionXLPipeline` on the plain UNet and VAE, fed the embeddings, eager,
  one prompt per call: the baseline of every ratio, measured in the same run;
- diffusers, static batch of N: one pipeline call with N prompts;
- our `StepBatcher` with 1/2/4/8 requests always in flight (img/s only).

The UNet computes in `--dtype` (bf16) and both sides decode with the VAE in float32. diffusers
upcasts the VAE itself only for an fp16 VAE with `force_upcast`, so its bf16 latents into a
float32 VAE raise; the baseline decodes as that upcast path does, latents cast to the VAE's dtype.

Full run: SDXL-architecture UNet and VAE (SDXL base's configs, random weights, so no download),
written as a diffusers checkpoint and read by the model loader; 1024x1024 at 30 steps CFG 5
(SDXL's usual) and MLPerf's text-to-image settings (20 steps, CFG 8). Reports per-image latency
percentiles, img/s, it/s and MFU (UNet FLOPs counted with torch's FlopCounterMode, against
`--peak-tflops`, 989 for an H100/H200 in bf16).

    python benchmarks/gpu_speed.py            # on cuda
    python benchmarks/gpu_speed.py --smoke    # the built-in tiny model, bf16 on the CPU, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from benchmarks.common import measure, save, summarize
from benchmarks.gpu_weights import SDXL_UNET

SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
ENGINE_COMPONENTS = ("unet", "vae", "scheduler")
FAST_PATHS = {"fast paths on": True, "fast paths off": False}
FAST, PLAIN = "ours, fast paths on", "ours, fast paths off"
BASELINE = "diffusers"
VAE_NOTE = (
    "float32 on both sides; the baseline casts its {dtype} latents to the VAE's float32 before "
    "decoding, as diffusers' SDXL pipeline does when it upcasts an fp16 VAE (force_upcast)"
)


def write_random_sdxl(folder: Path, device: str, dtype: Any) -> None:
    """A diffusers-layout SDXL in `folder`: UNet in `dtype`, VAE in float32, Euler scheduler,
    with the modules' own random initialisation (made on `device`, where it is fast)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        vae = AutoencoderKL(**SDXL_VAE)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))


def load_components(source: str) -> dict[str, Any]:
    """The engine's `ComponentWeights`, read by the model loader as ModelCache reads them."""
    from shared.config import ModelConfig
    from shared.weights.loader import load_model

    config = ModelConfig(id="bench", source=source, preview_decoder=None)
    return load_model(config, components=ENGINE_COMPONENTS).components


def embeddings(text_width: int, pooled_width: int, seed: int) -> Any:
    import numpy as np

    from shared.api.jobs import PromptEmbeddings

    rng = np.random.default_rng(seed)

    def draw(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return PromptEmbeddings(
        prompt_embeds=draw(1, 77, text_width),
        pooled_prompt_embeds=draw(1, pooled_width),
        negative_prompt_embeds=draw(1, 77, text_width),
        negative_pooled_prompt_embeds=draw(1, pooled_width),
    )


def job(emb: Any, side: int, steps: int, guidance: float, seed: int) -> Any:
    from shared.api.jobs import DenoiseJob

    return DenoiseJob(
        id=f"bench-{seed}",
        model="bench",
        embeddings=emb,
        width=side,
        height=side,
        steps=steps,
        guidance_scale=guidance,
        seeds=[seed],
        created_at=time.time(),
    )


def unet_flops(engine: Any, emb: Any, side: int, guidance: float) -> float:
    """FLOPs of one UNet forward for one image (both CFG halves when guidance is on)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    state = engine.prepare(job(emb, side, 1, guidance, 0))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        engine.step([state])
    return float(counter.get_total_flops())


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synchronized(fn: Callable[[], Any], device: str) -> Callable[[], None]:
    """`fn` that returns only once the device is idle, so a timing covers its queued kernels."""

    def call() -> None:
        fn()
        synchronize(device)

    return call


def ours_call(engine: Any, emb: Any, side: int, steps: int, guidance: float) -> Callable[[], Any]:
    return lambda: engine.run(job(emb, side, steps, guidance, 0), lambda _: None, lambda: False)


def diffusers_pipeline(engine: Any) -> Any:
    """diffusers' SDXL pipeline on `engine`'s UNet and float32 VAE, without text encoders (it is
    fed the embeddings) and without the invisible watermark, which our engine does not apply."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=engine.vae_decoder.vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=engine.unet,
        scheduler=EulerDiscreteScheduler.from_config(engine.scheduler_config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode_in_vae_dtype(pipe: Any, latents: Any) -> Any:
    """The pipeline's own decode tail, latents first cast to the VAE's dtype.

    diffusers casts them only when it upcasts an fp16 VAE with `force_upcast`; bf16 (or fp16)
    latents into a float32 VAE otherwise raise "Input type (c10::BFloat16) and bias type (float)
    should be the same". A float32 VAE is also what our engine decodes with (SDXL's VAE
    overflows in fp16), so both sides do the same decode work.
    """
    import torch

    vae = pipe.vae
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    with torch.inference_mode():
        image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")


def diffusers_call(pipe: Any, emb: Any, side: int, steps: int, guidance: float,
                   batch: int) -> Callable[[], Any]:  # fmt: skip
    """One pipeline call making `batch` images, one prompt (the same embeddings) per image."""
    import numpy as np
    import torch

    device = pipe.unet.device
    tensors = {}
    for name in (
        "prompt_embeds",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ):
        tensor = torch.tensor(getattr(emb, name), device=device, dtype=pipe.unet.dtype)
        tensors[name] = tensor.repeat(batch, *[1] * (tensor.ndim - 1))

    def call() -> Any:
        latents = pipe(
            **tensors,
            height=side,
            width=side,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator(device="cpu").manual_seed(i) for i in range(batch)],
            output_type="latent",
        ).images
        images = decode_in_vae_dtype(pipe, latents)
        # Our engine refuses non-finite pixels; a baseline timed on black images would not count.
        if not np.isfinite(images).all():
            raise RuntimeError(f"diffusers made non-finite pixels at {side}x{side}, {steps} steps")
        return images

    return call


def batched_throughput(engine: Any, emb: Any, side: int, steps: int, guidance: float,
                       concurrency: int, rounds: int) -> float:  # fmt: skip
    """Images per second with `concurrency` requests always in flight in one StepBatcher."""
    from shared.engine.batcher import StepBatcher

    batcher = StepBatcher(max_batch_images=max(8, concurrency))
    finished = threading.Semaphore(0)

    class Sink:
        def queued(self, event: Any) -> None: ...
        def step(self, event: Any, batch_requests: int) -> None: ...
        def finish(self, outcome: Any) -> None:
            finished.release()

        def cancelled(self) -> bool:
            return False

    total = concurrency * rounds
    try:
        for i in range(concurrency):  # warm-up round
            batcher.submit(engine, job(emb, side, steps, guidance, i), Sink())
        for _ in range(concurrency):
            finished.acquire()
        started = time.perf_counter()
        for i in range(concurrency):
            batcher.submit(engine, job(emb, side, steps, guidance, i), Sink())
        for done in range(total):
            finished.acquire()
            if done + concurrency < total:
                batcher.submit(engine, job(emb, side, steps, guidance, done), Sink())
        synchronize(str(engine.device))
        return total / (time.perf_counter() - started)
    finally:
        batcher.close()


def speed_row(samples_ms: list[float], images: int, steps: int, flops: float,
              peak_tflops: float) -> dict[str, float]:  # fmt: skip
    """Per-image latency percentiles (ms; an image of a static batch is ready when its call
    returns), img/s over all timed calls, it/s of a call at p50 and MFU at that img/s."""
    row = summarize(samples_ms)
    img_per_s = images * len(samples_ms) / (sum(samples_ms) / 1000)
    row["images_per_call"] = images
    row["img_per_s"] = img_per_s
    row["it_per_s"] = steps / (row["p50"] / 1000)
    row["mfu"] = flops * steps * img_per_s / (peak_tflops * 1e12)
    return row


def print_setting(title: str, rows: dict[str, dict[str, float]]) -> None:
    base = rows[BASELINE]
    print(f"\n{title}")
    header = ("img/s", "p50 ms", "p90 ms", "p99 ms", "it/s", "MFU", "x img/s", "x p50")
    print(f"{'path':<28}" + "".join(f"{h:>9}" for h in header))
    for name, r in rows.items():
        print(
            f"{name:<28}{r['img_per_s']:>9.2f}{r['p50']:>9.1f}{r['p90']:>9.1f}{r['p99']:>9.1f}"
            f"{r['it_per_s']:>9.2f}{r['mfu']:>9.1%}{r['img_per_s'] / base['img_per_s']:>9.2f}"
            f"{r['p50'] / base['p50']:>9.2f}"
        )


class Run(argparse.Namespace):
    """The run's settings after `--smoke` has applied its own."""

    device: str
    dtype: str
    side: int
    warmup: int
    runs: int
    batch: int
    rounds: int
    concurrencies: list[int]
    settings: dict[str, tuple[int, float]]
    peak_tflops: float
    smoke: bool


def time_setting(engines: dict[str, Any], pipe: Any, emb: Any, run: Run, steps: int,
                 guidance: float) -> tuple[dict[str, dict[str, float]], float]:  # fmt: skip
    """One row per path at these settings, each timed over `run.runs` calls after `run.warmup`
    untimed ones, and the FLOPs of one UNet forward for one image."""
    side, device = run.side, run.device
    flops = unet_flops(engines[PLAIN], emb, side, guidance)
    calls = {name: (ours_call(e, emb, side, steps, guidance), 1) for name, e in engines.items()}
    calls[BASELINE] = (diffusers_call(pipe, emb, side, steps, guidance, 1), 1)
    batched = diffusers_call(pipe, emb, side, steps, guidance, run.batch)
    calls[f"diffusers, batch of {run.batch}"] = (batched, run.batch)
    rows = {}
    for name, (fn, images) in calls.items():
        samples = measure(synchronized(fn, device), run.runs, run.warmup)
        rows[name] = speed_row(samples, images, steps, flops, run.peak_tflops)
    return rows, flops


def parse_args() -> Run:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each row")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per row")
    parser.add_argument("--batch", type=int, default=4, help="N of the static-batch row")
    parser.add_argument("--rounds", type=int, default=3, help="StepBatcher rounds per level")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, CPU, 64 px, 2 steps, 2 timed runs"
    )
    run = parser.parse_args(namespace=Run())
    if run.warmup < 0 or run.runs < 1 or run.batch < 1 or run.rounds < 1:
        parser.error("--warmup must be >= 0, and --runs, --batch and --rounds >= 1")

    import torch

    run.device = "cpu" if run.smoke or not torch.cuda.is_available() else "cuda"
    run.side = 64 if run.smoke else 1024
    run.settings = {"sdxl 30 steps cfg5": (30, 5.0), "mlperf 20 steps cfg8": (20, 8.0)}
    run.concurrencies = [1, 2, 4, 8]
    if run.smoke:  # still --dtype (bf16) end to end: the path a GPU run takes, on the CPU
        run.settings = {"smoke 2 steps cfg5": (2, 5.0)}
        run.concurrencies = [1, 2]
        run.warmup, run.runs, run.batch, run.rounds = 1, 2, 2, 1
    return run


def build_engines(run: Run) -> dict[str, Any]:
    """Our engine per fast-path setting, built by `build_engine` from the loader's components:
    the built-in tiny model for `--smoke`, else a random SDXL written to a scratch folder."""
    import torch

    from shared.engine.build import build_engine

    with tempfile.TemporaryDirectory(prefix="gpu-speed-") as scratch:
        source = "tiny"
        if not run.smoke:
            source = scratch
            write_random_sdxl(Path(scratch), run.device, getattr(torch, run.dtype))
        components = load_components(source)
        return {
            f"ours, {label}": build_engine(components, run.dtype, run.device, fast_paths(on))
            for label, on in FAST_PATHS.items()
        }


def fast_paths(on: bool) -> dict[str, bool]:
    return {"channels_last": on, "fuse_qkv": on}


def run_config(run: Run, device_name: str) -> dict[str, Any]:
    return {
        "device": device_name,
        "dtype": run.dtype,
        "vae": VAE_NOTE.format(dtype=run.dtype),
        "weights": "built-in tiny" if run.smoke else "random, SDXL base architecture",
        "side": run.side,
        "warmup": run.warmup,
        "runs": run.runs,
        "batch": run.batch,
        "stepbatcher_rounds": run.rounds,
        "concurrencies": run.concurrencies,
        "fast_paths": {label: fast_paths(on) for label, on in FAST_PATHS.items()},
        "peak_tflops": run.peak_tflops,
    }


def main() -> None:
    run = parse_args()

    import torch

    engines = build_engines(run)
    plain = engines[PLAIN]
    pipe = diffusers_pipeline(plain)
    unet_config = plain.unet.config
    pooled_width = (
        unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    )
    emb = embeddings(unet_config.cross_attention_dim, pooled_width, seed=0)

    rows: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {
        key: {} for key in ("settings", "batched_img_per_s", "ratios_p50", "ratios_img_per_s")
    }
    for setting, (steps, guidance) in run.settings.items():
        measured, flops = time_setting(engines, pipe, emb, run, steps, guidance)
        print_setting(f"{setting}: {run.side}x{run.side}, {run.dtype}", measured)
        base = measured[BASELINE]
        for name, row in measured.items():
            key = f"{name}, {setting}"
            rows[key] = row
            # Against this setting's own baseline: save() would divide every setting's rows by
            # the one baseline row it is given.
            extra["ratios_p50"][key] = row["p50"] / base["p50"]
            extra["ratios_img_per_s"][key] = row["img_per_s"] / base["img_per_s"]
        extra["settings"][setting] = {"steps": steps, "guidance": guidance, "unet_flops": flops}
        batched = {
            str(c): batched_throughput(engines[FAST], emb, run.side, steps, guidance, c, run.rounds)
            for c in run.concurrencies
        }
        extra["batched_img_per_s"][setting] = batched
        figures = ", ".join(f"c{c}: {v:.2f}" for c, v in batched.items())
        print(f"StepBatcher img/s ({FAST}), {setting}: {figures}")

    device_name = torch.cuda.get_device_name() if run.device == "cuda" else "CPU"
    config = run_config(run, device_name)
    print(f"\n{device_name}; VAE: {config['vae']}")
    out = "gpu_speed_smoke" if run.smoke else "gpu_speed"
    baseline = f"{BASELINE}, {next(iter(run.settings))}"
    path = save(out, config, rows, baseline, ylabel="ms per image, latency p50", extra=extra)
    print(f"saved {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

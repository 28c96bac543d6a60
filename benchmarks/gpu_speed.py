"""Denoising speed without Ray: our engine (alone and step-batched) vs plain diffusers.

The same modules serve both: an SDXL-architecture UNet and VAE (random weights, so no download;
SDXL base's own configs) in bf16 on CUDA. Plain diffusers is `StableDiffusionXLPipeline` called
with precomputed prompt embeddings, eager, one request at a time. Settings: 1024x1024, 30 steps,
CFG 5 (SDXL's usual), and MLPerf's text-to-image settings (20 steps, CFG 8); batched throughput
with 1/2/4/8 concurrent requests through `StepBatcher`. Reports s/image, it/s and MFU (UNet FLOPs
counted with torch's FlopCounterMode, against `--peak-tflops`, 989 for an H100/H200 in bf16).

    python benchmarks/gpu_speed.py            # on cuda
    python benchmarks/gpu_speed.py --smoke    # the built-in tiny model on the CPU, for CI
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from benchmarks.common import save, summarize
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


def build_modules(smoke: bool, device: str, dtype: Any) -> tuple[Any, Any, dict, int, int]:
    """(unet, vae, scheduler config, text width, pooled width) on `device`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if smoke:
        from shared.weights.builtin import resolve_builtin

        folder = resolve_builtin("tiny")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        import json

        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    else:
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
            vae = AutoencoderKL(**SDXL_VAE)
        scheduler = SDXL_SCHEDULER
    text_width = unet.config.cross_attention_dim
    pooled = (
        unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    )
    return unet.to(device).eval(), vae.to(device).eval(), scheduler, text_width, pooled


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


def time_ours(engine: Any, emb: Any, side: int, steps: int, guidance: float, runs: int) -> list:
    samples = []
    for run in range(runs + 1):
        started = time.perf_counter()
        engine.run(job(emb, side, steps, guidance, run), lambda _: None, lambda: False)
        synchronize(str(engine.device))
        if run:  # the first is a warm-up
            samples.append(time.perf_counter() - started)
    return samples


def time_diffusers(pipe: Any, emb: Any, side: int, steps: int, guidance: float, runs: int) -> list:
    import torch

    device = pipe.unet.device
    tensors = {
        name: torch.tensor(getattr(emb, name), device=device, dtype=pipe.unet.dtype)
        for name in (
            "prompt_embeds",
            "pooled_prompt_embeds",
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
        )
    }
    samples = []
    for run in range(runs + 1):
        started = time.perf_counter()
        pipe(
            **tensors,
            height=side,
            width=side,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator(device="cpu").manual_seed(run),
            output_type="np",
        )
        synchronize(str(device))
        if run:
            samples.append(time.perf_counter() - started)
    return samples


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, 64 px, 2 steps")
    args = parser.parse_args()

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from shared.engine.sdxl import SDXLEngine

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    side = 64 if args.smoke else 1024
    settings = {"sdxl 30 steps cfg5": (30, 5.0), "mlperf 20 steps cfg8": (20, 8.0)}
    if args.smoke:
        settings = {"smoke 2 steps cfg5": (2, 5.0)}
    runs = 1 if args.smoke else args.runs
    concurrencies = [1, 2] if args.smoke else [1, 2, 4, 8]

    unet, vae, scheduler_config, text_width, pooled_width = build_modules(args.smoke, device, dtype)
    engine = SDXLEngine(unet, vae, scheduler_config, device=device, dtype=dtype)
    # The same modules for diffusers: a pipeline without text encoders, fed the embeddings.
    pipe = StableDiffusionXLPipeline(
        vae=engine.vae_decoder.vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=engine.unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
    )
    pipe.set_progress_bar_config(disable=True)
    emb = embeddings(text_width, pooled_width, seed=0)

    rows: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {"settings": {}, "batched_img_per_s": {}}
    for name, (steps, guidance) in settings.items():
        flops = unet_flops(engine, emb, side, guidance)
        for path, timer in (("ours", time_ours), ("diffusers", time_diffusers)):
            target = engine if path == "ours" else pipe
            samples = timer(target, emb, side, steps, guidance, runs)
            row = summarize([s * 1000 for s in samples])
            seconds = row["p50"] / 1000
            row["s_per_image"] = seconds
            row["it_per_s"] = steps / seconds
            row["mfu"] = flops * steps / seconds / (args.peak_tflops * 1e12)
            rows[f"{path}, {name}"] = row
        extra["settings"][name] = {"steps": steps, "guidance": guidance, "unet_flops": flops}
        extra["batched_img_per_s"][name] = {
            str(c): batched_throughput(engine, emb, side, steps, guidance, c, rounds=max(1, runs))
            for c in concurrencies
        }

    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{side}x{side}, {device_name}, {dtype}")
    print(f"{'path':<36}{'s/image':>10}{'it/s':>9}{'MFU':>8}")
    for name, row in rows.items():
        print(f"{name:<36}{row['s_per_image']:>10.3f}{row['it_per_s']:>9.1f}{row['mfu']:>8.1%}")
    for name, by_concurrency in extra["batched_img_per_s"].items():
        figures = ", ".join(f"c{c}: {v:.2f}" for c, v in by_concurrency.items())
        print(f"batched img/s, {name}: {figures}")
    baseline = next(key for key in rows if key.startswith("diffusers"))
    out = "gpu_speed_smoke" if args.smoke else "gpu_speed"
    config = {"device": device_name, "dtype": str(dtype), "side": side, "runs": runs,
              "peak_tflops": args.peak_tflops}  # fmt: skip
    path = save(out, config, rows, baseline, ylabel="ms per image (p50)", extra=extra)
    print(f"saved {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

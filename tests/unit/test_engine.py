"""SDXLEngine against diffusers' own StableDiffusionXLPipeline on the built-in tiny model: same
pixels, deterministic seeds, step events and previews, cancellation, and refused bad input."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from PIL import Image

from shared.api.jobs import DenoiseJob, PromptEmbeddings
from shared.api.schemas import ResultEvent, StepEvent
from shared.api.vocabulary import SCHEDULER_NAMES
from shared.engine.samplers import build_scheduler
from shared.engine.sdxl import SDXLEngine
from shared.errors import GenerationError, InvalidRequestError, RequestCancelledError

STEPS = 5


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> SDXLEngine:
    return SDXLEngine.from_pretrained_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt_tensors(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    # encode_prompt runs without no_grad of its own; detach so the tensors convert to numpy.
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            "a photo of a cat in the snow",
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt="blurry dark",
        )
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": negative,
        "negative_pooled_prompt_embeds": negative_pooled,
    }


@pytest.fixture(scope="module")
def base_job(prompt_tensors: dict[str, torch.Tensor]) -> DenoiseJob:
    embeddings = PromptEmbeddings(**{k: v.numpy() for k, v in prompt_tensors.items()})
    return DenoiseJob(
        id="job-1",
        model="tiny",
        embeddings=embeddings,
        width=64,
        height=64,
        steps=STEPS,
        guidance_scale=5.0,
        seeds=[1],
    )


def run(
    engine: SDXLEngine, job: DenoiseJob, cancelled: Callable[[], bool] = lambda: False
) -> tuple[ResultEvent, list[StepEvent]]:
    events: list[StepEvent] = []
    return engine.run(job, events.append, cancelled), events


def pixels(result: ResultEvent) -> np.ndarray:
    decoded = [Image.open(io.BytesIO(base64.b64decode(image.b64))) for image in result.images]
    return np.stack([np.asarray(img) for img in decoded])


class UNetCalls:
    """Counts forward passes of an engine's UNet (a torch forward hook): the steps actually run."""

    def __init__(self, engine: SDXLEngine) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._handle = engine.unet.register_forward_hook(self._seen)

    def _seen(self, *_: object) -> None:
        with self._lock:
            self.count += 1

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture()
def unet_calls(engine: SDXLEngine) -> Iterator[UNetCalls]:
    calls = UNetCalls(engine)
    yield calls
    calls.close()


def diffusers_pixels(
    pipe: StableDiffusionXLPipeline,
    engine: SDXLEngine,
    tensors: dict[str, torch.Tensor],
    job: DenoiseJob,
    **inputs: Any,
) -> np.ndarray:
    """What a diffusers pipeline returns for the job (and any further `inputs` of that
    pipeline), as uint8 (its own numpy_to_pil rounding)."""
    original = pipe.scheduler
    if job.scheduler is not None:
        pipe.scheduler = build_scheduler(job.scheduler, engine.scheduler_config)
    try:
        images = pipe(
            **tensors,
            **inputs,
            height=job.height,
            width=job.width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            num_images_per_prompt=len(job.seeds),
            generator=[torch.Generator().manual_seed(seed) for seed in job.seeds],
            output_type="np",
        ).images
    finally:
        pipe.scheduler = original
    return (images * 255).round().astype(np.uint8)


EQUALITY_CASES = {
    "euler-default": {},
    "euler-ancestral": {"scheduler": "euler_a"},
    "no-cfg": {"guidance_scale": 1.0},
    "two-seeds": {"seeds": [4, 5]},
    "non-square": {"width": 96, "height": 64},
    "ancestral-two-seeds-tall": {"scheduler": "euler_a", "seeds": [7, 8], "height": 96},
    **{f"scheduler-{name}": {"scheduler": name, "seeds": [9]} for name in SCHEDULER_NAMES},
}


@pytest.mark.parametrize("overrides", EQUALITY_CASES.values(), ids=EQUALITY_CASES.keys())
def test_final_image_equals_diffusers_pipeline(
    pipe: StableDiffusionXLPipeline,
    engine: SDXLEngine,
    prompt_tensors: dict[str, torch.Tensor],
    base_job: DenoiseJob,
    overrides: dict[str, object],
) -> None:
    job = replace(base_job, **overrides)
    result, events = run(engine, job)
    expected = diffusers_pixels(pipe, engine, prompt_tensors, job)
    ours = pixels(result)
    assert ours.shape == expected.shape == (len(job.seeds), job.height, job.width, 3)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    assert ours.std() > 1, "a flat image would make the comparison meaningless"
    assert [image.seed for image in result.images] == job.seeds
    assert len(events) == job.steps


def test_same_seed_same_bytes_other_seed_other_bytes(
    engine: SDXLEngine, base_job: DenoiseJob
) -> None:
    job = replace(base_job, scheduler="euler_a", steps=3)
    first, _ = run(engine, job)
    again, _ = run(engine, job)
    other, _ = run(engine, replace(job, seeds=[2]))
    assert first.images[0].b64 == again.images[0].b64
    assert first.images[0].b64 != other.images[0].b64


@pytest.mark.parametrize("kind", ["latent", "tiny", "full"])
def test_step_events_carry_previews(engine: SDXLEngine, base_job: DenoiseJob, kind: str) -> None:
    job = replace(
        base_job, seeds=[3, 4], width=96, preview=kind, preview_every=2, preview_max_side=32
    )
    result, events = run(engine, job)
    assert [event.index for event in events] == list(range(1, STEPS + 1))
    assert {event.total for event in events} == {STEPS}
    assert all(event.id == job.id for event in events)
    elapsed = [event.elapsed_ms for event in events]
    assert elapsed == sorted(elapsed)
    with_previews = [event.index for event in events if event.previews]
    assert with_previews == [2, 4, 5]  # every 2nd step, and always the last
    for event in events:
        assert len(event.previews) in (0, len(job.seeds))
        for preview in event.previews:
            img = Image.open(io.BytesIO(base64.b64decode(preview.b64)))
            assert img.format == "JPEG" and preview.format == "jpeg"
            assert img.size == (preview.width, preview.height) == (32, 21)
    assert len(result.images) == 2


def test_tiny_preview_without_autoencoder_is_refused_before_any_step(
    engine: SDXLEngine, base_job: DenoiseJob
) -> None:
    bare = SDXLEngine(engine.unet, engine.vae_decoder.vae, engine.scheduler_config)
    calls = UNetCalls(bare)
    events: list[StepEvent] = []
    with pytest.raises(InvalidRequestError) as caught:
        bare.run(replace(base_job, preview="tiny"), events.append, lambda: False)
    calls.close()
    assert caught.value.code == "preview_unavailable" and caught.value.param == "preview"
    assert events == [] and calls.count == 0


def test_cancellation_stops_at_the_next_step(
    engine: SDXLEngine, base_job: DenoiseJob, unet_calls: UNetCalls
) -> None:
    events: list[StepEvent] = []
    with pytest.raises(RequestCancelledError):
        engine.run(replace(base_job, steps=10), events.append, lambda: len(events) >= 3)
    assert [event.index for event in events] == [1, 2, 3]
    assert unet_calls.count == 3


def test_unknown_scheduler_is_refused(
    engine: SDXLEngine, base_job: DenoiseJob, unet_calls: UNetCalls
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        run(engine, replace(base_job, scheduler="warp_drive"))  # type: ignore[arg-type]
    assert caught.value.param == "scheduler"
    assert all(name in caught.value.message for name in SCHEDULER_NAMES)
    assert unet_calls.count == 0


def test_nan_from_the_vae_is_an_error_not_an_image(
    engine: SDXLEngine, base_job: DenoiseJob, tiny_model_dir: Path
) -> None:
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))
    broken = SDXLEngine(engine.unet, vae, engine.scheduler_config)
    calls = UNetCalls(broken)
    with pytest.raises(GenerationError) as caught:
        run(broken, replace(base_job, steps=2))
    assert caught.value.code == "nan_output"
    calls.close()
    assert calls.count == 2


def test_result_metadata_and_formats(engine: SDXLEngine, base_job: DenoiseJob) -> None:
    job = replace(
        base_job, steps=1, output_format="webp", timings={"queue_ms": 5.0, "encode_ms": 7.0}
    )
    result, _ = run(engine, job)
    assert (result.id, result.model, result.backend) == ("job-1", "tiny", "local")
    image = result.images[0]
    decoded = Image.open(io.BytesIO(base64.b64decode(image.b64)))
    assert decoded.format == "WEBP" and decoded.size == (image.width, image.height) == (64, 64)
    assert (result.timings.queue_ms, result.timings.encode_ms) == (5.0, 7.0)
    assert result.timings.denoise_ms > 0 and result.timings.decode_ms > 0


def test_concurrent_jobs_do_not_share_sampler_state(
    engine: SDXLEngine, base_job: DenoiseJob, unet_calls: UNetCalls
) -> None:
    jobs = [replace(base_job, scheduler="dpmpp_2m", steps=3, seeds=[seed]) for seed in (21, 22)]
    sequential = [run(engine, job)[0].images[0].b64 for job in jobs]
    before = unet_calls.count
    concurrent: dict[int, str] = {}

    def work(position: int) -> None:
        concurrent[position] = run(engine, jobs[position])[0].images[0].b64

    threads = [threading.Thread(target=work, args=(position,)) for position in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [concurrent[0], concurrent[1]] == sequential
    assert unet_calls.count - before == 6


def test_fast_paths_keep_the_pixels(
    engine: SDXLEngine, base_job: DenoiseJob, tiny_model_dir: Path
) -> None:
    from diffusers import UNet2DConditionModel

    from shared.engine.build import apply_fast_paths

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    fast_unet = apply_fast_paths(unet, channels_last=True, fuse_qkv=True)
    assert any("to_qkv" in name for name, _ in fast_unet.named_modules())
    conv = next(m for m in fast_unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    fast = SDXLEngine(fast_unet, engine.vae_decoder.vae, engine.scheduler_config)
    job = replace(base_job, scheduler="dpmpp_2m", seeds=[11, 12])
    difference = np.abs(pixels(run(fast, job)[0]).astype(int) - pixels(run(engine, job)[0]))
    assert difference.max() <= 1

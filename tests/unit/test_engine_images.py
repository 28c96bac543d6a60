"""Image-conditioned generation in SDXLEngine against diffusers' own pipelines on the tiny models:
img2img equals `StableDiffusionXLImg2ImgPipeline`, inpainting equals
`StableDiffusionXLInpaintPipeline` with a 4-channel and a 9-channel UNet, and the start image,
noise-injection masks and mixed batches behave as documented."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from shared.api.jobs import DenoiseJob, NoiseInjection, PromptEmbeddings
from shared.config import ModelConfig
from shared.engine.build import build_engine
from shared.engine.image_inputs import pixels_to_tensor
from shared.engine.sdxl import SDXLEngine
from shared.errors import InvalidRequestError
from shared.weights.builtin import resolve_builtin
from shared.weights.loader import load_suite
from tests.unit.test_engine import diffusers_pixels, pixels, run

STEPS = 6
PROMPT = "a photo of a red house in the forest"


def _picture(width: int, height: int) -> np.ndarray:
    """A smooth, structured RGB image (gradients and a disc), uint8 (H, W, 3)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2) < (min(width, height) * 0.25) ** 2
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = np.where(disc, 230.0, 40.0)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def _mask(width: int, height: int) -> np.ndarray:
    """White (repaint) over the right half and a soft edge, uint8 (H, W)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    mask[:, width // 2 - 3 : width // 2] = 100  # below one half: binarised to keep
    return mask


def _tensors(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": negative,
        "negative_pooled_prompt_embeds": negative_pooled,
    }


class Model:
    """One tiny checkpoint: our engine, diffusers' three pipelines and a job to start from."""

    def __init__(self, path: Path) -> None:
        self.txt2img = StableDiffusionXLPipeline.from_pretrained(path)
        self.txt2img.set_progress_bar_config(disable=True)
        self.engine = SDXLEngine.from_pretrained_dir(path)
        self.tensors = _tensors(self.txt2img)
        self.job = DenoiseJob(
            id="job",
            model="tiny",
            embeddings=PromptEmbeddings(**{k: v.numpy() for k, v in self.tensors.items()}),
            width=64,
            height=64,
            steps=STEPS,
            guidance_scale=5.0,
            seeds=[3],
        )

    def diffusers(self, kind: type, job: DenoiseJob, **inputs: object) -> np.ndarray:
        pipe = kind(**self.txt2img.components)
        pipe.set_progress_bar_config(disable=True)
        return diffusers_pixels(pipe, self.engine, self.tensors, job, **inputs)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Model:
    return Model(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_inpaint() -> Model:
    return Model(resolve_builtin("tiny-inpaint"))


def _assert_equal(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.shape == expected.shape
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    assert ours.std() > 1, "a flat image would make the comparison meaningless"


IMG2IMG_CASES = {
    "half": {"strength": 0.5},
    "most": {"strength": 0.8, "seeds": [4, 5]},
    "full": {"strength": 1.0},
    "ancestral": {"strength": 0.6, "scheduler": "euler_a", "seeds": [6, 7]},
    "dpmpp": {"strength": 0.7, "scheduler": "dpmpp_2m"},
    "ddim-wide": {"strength": 0.5, "scheduler": "ddim", "width": 96},
}


@pytest.mark.parametrize("overrides", IMG2IMG_CASES.values(), ids=IMG2IMG_CASES.keys())
def test_img2img_equals_diffusers(tiny: Model, overrides: dict[str, object]) -> None:
    job = replace(tiny.job, **overrides)
    image = _picture(job.width, job.height)
    job = replace(job, init_image=image)
    result, events = run(tiny.engine, job)
    expected = tiny.diffusers(
        StableDiffusionXLImg2ImgPipeline, job, image=Image.fromarray(image), strength=job.strength
    )
    _assert_equal(pixels(result), expected)
    assert len(events) == int(job.steps * job.strength)  # the skipped steps are not run


INPAINT_CASES = {
    "full-strength": {"strength": 1.0},
    "partial": {"strength": 0.6},
    "ancestral-two-seeds": {"strength": 1.0, "scheduler": "euler_a", "seeds": [8, 9]},
    "partial-ancestral": {"strength": 0.75, "scheduler": "euler_a"},
    "no-cfg": {"strength": 0.9, "guidance_scale": 1.0},
}


@pytest.mark.parametrize("unet", ["4-channel", "9-channel"])
@pytest.mark.parametrize("overrides", INPAINT_CASES.values(), ids=INPAINT_CASES.keys())
def test_inpainting_equals_diffusers(
    request: pytest.FixtureRequest, unet: str, overrides: dict[str, object]
) -> None:
    model: Model = request.getfixturevalue("tiny" if unet == "4-channel" else "tiny_inpaint")
    assert model.engine.inpainting_unet == (unet == "9-channel")
    job = replace(model.job, **overrides)
    image, mask = _picture(job.width, job.height), _mask(job.width, job.height)
    job = replace(job, init_image=image, mask=mask)
    result, _ = run(model.engine, job)
    expected = model.diffusers(
        StableDiffusionXLInpaintPipeline,
        job,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask),
        strength=job.strength,
    )
    _assert_equal(pixels(result), expected)


def test_4_channel_inpainting_ends_on_the_init_image_outside_the_mask(tiny: Model) -> None:
    image, mask = _picture(64, 64), _mask(64, 64)
    state = tiny.engine.prepare(replace(tiny.job, init_image=image, mask=mask))
    while not state.finished:
        tiny.engine.step([state])
    assert state.inpainting is not None and state.inpainting.image_latents is not None
    known = state.inpainting.image_latents
    # The last step puts the un-noised image latents back outside the mask (latent columns
    # 0-3 of 8 here); inside it the latents are the denoiser's.
    assert torch.equal(state.latents[..., :4], known[..., :4])
    assert (state.latents[..., 4:] - known[..., 4:]).abs().mean() > 0.1


def test_a_9_channel_model_generates_from_text_alone(tiny_inpaint: Model) -> None:
    """Without a mask the whole image is repainted: diffusers' inpainting with a white mask."""
    job = tiny_inpaint.job
    result, events = run(tiny_inpaint.engine, job)
    expected = tiny_inpaint.diffusers(
        StableDiffusionXLInpaintPipeline,
        job,
        image=Image.new("RGB", (job.width, job.height)),
        mask_image=Image.new("L", (job.width, job.height), 255),
        strength=1.0,
    )
    _assert_equal(pixels(result), expected)
    assert len(events) == job.steps


def test_start_image_latents_follow_the_documented_formula(tiny: Model) -> None:
    image = _picture(64, 64)
    job = replace(tiny.job, start_image=image, start_noise=0.3, seeds=[11, 12])
    state = tiny.engine.prepare(job)
    generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
    vae = tiny.engine.vae_decoder.vae
    with torch.no_grad():
        tensor = pixels_to_tensor(image, torch.device("cpu"))
        latents = torch.cat(
            [vae.encode(tensor).latent_dist.sample(generator=g) for g in generators]
        )
        latents = latents * vae.config.scaling_factor
        noise = randn_tensor(latents.shape, generator=generators)
    sigma = state.sampling.scheduler.init_noise_sigma
    expected = sigma * (math.sqrt(0.7) * latents + math.sqrt(0.3) * noise)
    assert torch.allclose(state.latents, expected, atol=1e-5)
    assert state.total == job.steps  # the full schedule runs
    first, _ = run(tiny.engine, job)
    again, _ = run(tiny.engine, job)
    assert first.images[0].b64 == again.images[0].b64
    plain, _ = run(tiny.engine, replace(tiny.job, seeds=job.seeds))
    assert first.images[0].b64 != plain.images[0].b64


def _left_half_zero(width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.float32)
    mask[:, width // 2 :] = 1.0
    return mask


def test_noise_mask_injects_only_inside_the_mask_and_only_in_its_window(tiny: Model) -> None:
    spec = NoiseInjection(mask=_left_half_zero(64, 64), strength=1.0, start=0.0, end=0.5)
    with_mask = tiny.engine.prepare(replace(tiny.job, noise_mask=spec))
    without = tiny.engine.prepare(tiny.job)
    differences = []
    for _ in range(STEPS):
        tiny.engine.step([with_mask])
        tiny.engine.step([without])
        differences.append((with_mask.latents - without.latents).abs())
        if len(differences) == 1:
            # After one step only the injected noise differs: inside the mask, nowhere else.
            assert differences[0][..., :4].max() == 0
            assert differences[0][..., 4:].mean() > 0.1
    # Injection stops at half the schedule, but its effect propagates through the UNet.
    assert differences[-1].max() > 0


def test_noise_mask_after_its_window_changes_nothing(tiny: Model) -> None:
    spec = NoiseInjection(mask=np.ones((64, 64), np.float32), strength=1.0, start=0.5, end=1.0)
    late = tiny.engine.prepare(replace(tiny.job, noise_mask=spec))
    plain = tiny.engine.prepare(tiny.job)
    for index in range(STEPS):
        tiny.engine.step([late])
        tiny.engine.step([plain])
        same = torch.equal(late.latents, plain.latents)
        assert same == ((index + 1) / STEPS < 0.5)


def test_noise_masks_are_deterministic_per_seed(tiny: Model) -> None:
    spec = NoiseInjection(mask=_left_half_zero(64, 64), strength=0.8, start=0.0, end=1.0)
    job = replace(tiny.job, noise_mask=spec)
    first, _ = run(tiny.engine, job)
    second, _ = run(tiny.engine, job)
    other, _ = run(tiny.engine, replace(job, seeds=[99]))
    plain, _ = run(tiny.engine, tiny.job)
    assert first.images[0].b64 == second.images[0].b64
    assert len({first.images[0].b64, other.images[0].b64, plain.images[0].b64}) == 3


def test_mixed_batch_equals_each_request_alone(tiny: Model) -> None:
    image, mask = _picture(64, 64), _mask(64, 64)
    spec = NoiseInjection(mask=_left_half_zero(64, 64), strength=0.7, start=0.0, end=0.6)
    jobs = [
        replace(tiny.job, id="txt2img", seeds=[1]),
        replace(tiny.job, id="img2img", init_image=image, strength=0.5, seeds=[2, 3]),
        replace(tiny.job, id="inpaint", init_image=image, mask=mask, scheduler="euler_a"),
        replace(tiny.job, id="start", start_image=image, start_noise=0.5, guidance_scale=1.0),
        replace(tiny.job, id="noise", noise_mask=spec, steps=4),
    ]
    alone = [pixels(run(tiny.engine, job)[0]) for job in jobs]
    states = [tiny.engine.prepare(job) for job in jobs]
    finished: dict[str, np.ndarray] = {}
    while states:
        tiny.engine.step(states)  # one UNet call for all of them, whatever their progress
        done = [state for state in states if state.finished]
        for state, outcome in zip(done, tiny.engine.decode(done) if done else [], strict=True):
            assert not isinstance(outcome, Exception)
            finished[state.job.id] = pixels(outcome)
        states = [state for state in states if not state.finished]
    for job, expected in zip(jobs, alone, strict=True):
        assert np.abs(finished[job.id].astype(int) - expected.astype(int)).max() <= 1, job.id


def test_bad_image_inputs_are_refused_before_any_step(tiny: Model) -> None:
    image = _picture(64, 64)
    cases = {
        "init_image": replace(tiny.job, init_image=_picture(32, 64)),
        "mask": replace(tiny.job, init_image=image, mask=np.zeros((64, 64, 3), np.uint8)),
        "strength": replace(tiny.job, init_image=image, strength=0.1),
        "image_prompt": replace(tiny.job, image_embeds=np.zeros((1, 32), np.float32)),
    }
    for param, job in cases.items():
        with pytest.raises(InvalidRequestError) as caught:
            tiny.engine.check(job)
        assert caught.value.param == param


@pytest.fixture(scope="module")
def adapted(tiny: Model, tiny_model_dir: Path) -> tuple[SDXLEngine, StableDiffusionXLPipeline]:
    """Our engine built from the cache's components of `tiny` + the tiny IP-Adapter, and
    diffusers' pipeline with the same adapter loaded the documented way."""
    config = ModelConfig(id="tiny", source="tiny", ip_adapter={"source": "tiny-ip-adapter"})
    engine = build_engine(load_suite(config).components, "float32", "cpu")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(resolve_builtin("tiny-ip-adapter")),
        subfolder="sdxl_models",
        weight_name="ip-adapter_sdxl.safetensors",
        image_encoder_folder="image_encoder",
    )
    return engine, pipe


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_image_prompt_equals_diffusers_ip_adapter_embeds(
    tiny: Model, adapted: tuple[SDXLEngine, StableDiffusionXLPipeline], scale: float
) -> None:
    engine, pipe = adapted
    embeds = np.random.default_rng(0).standard_normal((1, engine.image_embeds_dim))
    job = replace(tiny.job, image_embeds=embeds.astype(np.float32), image_prompt_scale=scale)
    result, _ = run(engine, job)
    pipe.set_ip_adapter_scale(scale)
    positive = torch.tensor(job.image_embeds).reshape(1, 1, -1)
    embeds = [torch.cat([torch.zeros_like(positive), positive])]
    expected = diffusers_pixels(pipe, engine, tiny.tensors, job, ip_adapter_image_embeds=embeds)
    _assert_equal(pixels(result), expected)
    plain, _ = run(engine, tiny.job)
    assert result.images[0].b64 != plain.images[0].b64


def test_image_prompts_of_any_scale_share_a_call_with_plain_requests(
    tiny: Model, adapted: tuple[SDXLEngine, StableDiffusionXLPipeline]
) -> None:
    engine, _ = adapted
    embeds = np.random.default_rng(1).standard_normal((1, engine.image_embeds_dim))
    embeds = embeds.astype(np.float32)
    jobs = [
        replace(tiny.job, id="a", image_embeds=embeds, image_prompt_scale=0.7),
        replace(tiny.job, id="b", seeds=[5, 6]),
        replace(tiny.job, id="c", image_embeds=embeds, image_prompt_scale=1.0, guidance_scale=1),
    ]
    alone = [pixels(run(engine, job)[0]) for job in jobs]
    states = [engine.prepare(job) for job in jobs]
    while not states[0].finished:
        engine.step(states)
    for state, expected in zip(states, alone, strict=True):
        (outcome,) = engine.decode([state])
        assert not isinstance(outcome, Exception)
        assert np.abs(pixels(outcome).astype(int) - expected.astype(int)).max() <= 1
    # Without an adapter's image prompt a request on an adapter engine is the plain model's.
    plain = pixels(run(tiny.engine, jobs[1])[0])
    assert np.abs(alone[1].astype(int) - plain.astype(int)).max() <= 1

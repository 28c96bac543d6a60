"""The refiner handoff in SDXLEngine against diffusers' ensemble of experts on the tiny model and
the built-in tiny refiner: `StableDiffusionXLPipeline(denoising_end=switch_at,
output_type="latent")` (or the img2img pipeline) followed by the refiner's
`StableDiffusionXLImg2ImgPipeline(denoising_start=switch_at)`, for several samplers and switch
points; in the step batcher refiner stages share UNet calls only with refiner stages."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from shared.api.jobs import DenoiseJob, RefinerHandoff
from shared.engine.batcher import StepBatcher
from shared.engine.prompts import PromptEncoder
from shared.engine.samplers import build_scheduler
from shared.engine.sdxl import SDXLEngine
from shared.errors import InvalidRequestError
from shared.weights.builtin import resolve_builtin
from tests.unit.test_batcher import RecordingSink
from tests.unit.test_engine import pixels, run
from tests.unit.test_engine_images import PROMPT, Model, _assert_equal, _picture


class Ensemble:
    """Our engine with the refiner, and diffusers' base and refiner pipelines."""

    def __init__(self, model: Model, path: Path) -> None:
        self.model = model
        self.refiner_pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(path)
        self.refiner_pipe.set_progress_bar_config(disable=True)
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        base = model.engine
        self.engine = SDXLEngine(
            unet=base.unet,
            vae=base.vae_decoder.vae,
            scheduler_config=base.scheduler_config,
            refiner_unet=UNet2DConditionModel.from_pretrained(path / "unet"),
            refiner_scheduler_config=config,
        )
        # The refiner encodes an empty negative as text (its model_index.json says so).
        encoder = PromptEncoder.from_pretrained_dir(resolve_builtin("tiny"))
        encoder.force_zeros_for_empty_prompt = bool(
            json.loads((path / "model_index.json").read_text())["force_zeros_for_empty_prompt"]
        )
        (self.refiner_embeddings,) = encoder.encode([(PROMPT, None)])

    def job(self, switch_at: float = 0.8, **overrides: object) -> DenoiseJob:
        handoff = RefinerHandoff(switch_at=switch_at, embeddings=self.refiner_embeddings)
        return replace(self.model.job, refiner=handoff, **overrides)

    def diffusers(self, job: DenoiseJob) -> np.ndarray:
        assert job.refiner is not None
        generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
        base = self.model.txt2img
        inputs: dict[str, object] = {}
        if job.init_image is not None:
            base = StableDiffusionXLImg2ImgPipeline(**base.components)
            base.set_progress_bar_config(disable=True)
            inputs = {"image": Image.fromarray(job.init_image), "strength": job.strength}
        else:
            inputs = {"height": job.height, "width": job.width}
        refiner = self.refiner_pipe
        original = base.scheduler, refiner.scheduler
        if job.scheduler is not None:
            base.scheduler = build_scheduler(job.scheduler, self.engine.scheduler_config)
            refiner.scheduler = build_scheduler(job.scheduler, self.engine.refiner.scheduler_config)
        try:
            latents = base(
                **self.model.tensors,
                **inputs,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance_scale,
                generator=generators,
                denoising_end=job.refiner.switch_at,
                output_type="latent",
            ).images
            images = refiner(
                prompt=PROMPT,
                image=latents,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance_scale,
                generator=generators,
                denoising_start=job.refiner.switch_at,
                aesthetic_score=job.refiner.aesthetic_score,
                negative_aesthetic_score=job.refiner.negative_aesthetic_score,
                output_type="np",
            ).images
        finally:
            base.scheduler, refiner.scheduler = original
        return (images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def ensemble(tiny_model_dir: Path) -> Ensemble:
    return Ensemble(Model(tiny_model_dir), resolve_builtin("tiny-refiner"))


CASES = {
    "euler-0.8": {},
    "euler-half": {"switch_at": 0.5, "steps": 8},
    "ancestral": {"scheduler": "euler_a", "seeds": [4]},
    "dpmpp": {"scheduler": "dpmpp_2m", "switch_at": 0.7},
    "ddim-no-cfg": {"scheduler": "ddim", "guidance_scale": 1.0},
    "two-thirds": {"switch_at": 0.6, "seeds": [5]},
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_refiner_handoff_equals_diffusers_ensemble(
    ensemble: Ensemble, case: dict[str, object]
) -> None:
    job = ensemble.job(**case)
    result, events = run(ensemble.engine, job)
    _assert_equal(pixels(result), ensemble.diffusers(job))
    assert [event.index for event in events] == list(range(1, len(events) + 1))
    assert all(event.total == len(events) for event in events)


def test_aesthetic_scores_reach_the_refiner(ensemble: Ensemble) -> None:
    job = ensemble.job(switch_at=0.6)
    assert job.refiner is not None
    scored = replace(job, refiner=replace(job.refiner, aesthetic_score=9.0))
    result = pixels(run(ensemble.engine, scored)[0])
    _assert_equal(result, ensemble.diffusers(scored))
    assert not np.array_equal(result, pixels(run(ensemble.engine, job)[0]))


def test_refiner_after_img2img_equals_diffusers(ensemble: Ensemble) -> None:
    image = _picture(64, 64)
    job = ensemble.job(switch_at=0.7, steps=10, init_image=image, strength=0.8)
    result, events = run(ensemble.engine, job)
    _assert_equal(pixels(result), ensemble.diffusers(job))
    assert len(events) < job.steps  # strength skipped the first 20% of the schedule


def test_the_refiner_changes_the_image_and_steps_add_up(ensemble: Ensemble) -> None:
    job = ensemble.job()
    refined, events = run(ensemble.engine, job)
    plain, plain_events = run(ensemble.engine, replace(job, refiner=None))
    assert not np.array_equal(pixels(refined), pixels(plain))
    # Euler, 6 steps, switch at 0.8: the base runs the timesteps >= 200, the refiner the rest.
    assert len(events) == len(plain_events) == job.steps


def test_refiner_stages_batch_apart_from_base_stages(ensemble: Ensemble) -> None:
    engine = ensemble.engine
    jobs = [
        replace(ensemble.job(), id="refined", seeds=[1]),
        replace(ensemble.job(switch_at=0.5), id="half", seeds=[2]),
        replace(ensemble.model.job, id="plain", seeds=[3]),
    ]
    alone = [pixels(run(engine, job)[0]) for job in jobs]
    calls: dict[str, list[int]] = {"base": [], "refiner": []}
    assert engine.refiner is not None
    hooks = [
        engine.unet.register_forward_hook(lambda m, a, o: calls["base"].append(a[0].shape[0])),
        engine.refiner.unet.register_forward_hook(
            lambda m, a, o: calls["refiner"].append(a[0].shape[0])
        ),
    ]
    batcher = StepBatcher(max_batch_images=8)
    sinks = [RecordingSink() for _ in jobs]
    try:
        for job, sink in zip(jobs, sinks, strict=True):
            batcher.submit(engine, job, sink)
        results = [sink.result() for sink in sinks]
    finally:
        batcher.close()
        for hook in hooks:
            hook.remove()
    for result, expected in zip(results, alone, strict=True):
        assert np.abs(pixels(result).astype(int) - expected).max() <= 1  # other batch sizes
    # Every call holds whole requests of one stage (2 rows each with guidance).
    assert max(calls["base"]) > 2 and set(calls["refiner"]) <= {2, 4}
    steps = sum(len(sink.steps) for sink in sinks)
    assert (sum(calls["base"]) + sum(calls["refiner"])) // 2 == steps


def test_a_refiner_is_refused_where_it_cannot_run(ensemble: Ensemble) -> None:
    with pytest.raises(InvalidRequestError) as none:
        ensemble.model.engine.check(ensemble.job())
    assert (none.value.code, none.value.param) == ("refiner_unsupported", "refiner")
    image, mask = _picture(64, 64), np.full((64, 64), 255, dtype=np.uint8)
    with pytest.raises(InvalidRequestError) as inpaint:
        ensemble.engine.check(ensemble.job(init_image=image, mask=mask))
    assert inpaint.value.code == "refiner_unsupported"
    with pytest.raises(InvalidRequestError) as late:
        ensemble.engine.check(ensemble.job(switch_at=0.1, steps=4))
    assert late.value.param == "refiner.switch_at"

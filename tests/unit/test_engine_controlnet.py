"""ControlNets in SDXLEngine against diffusers on the tiny model and the built-in tiny ControlNet:
one ControlNet equals `StableDiffusionXLControlNetPipeline`, two equal its MultiControlNet form,
with img2img it equals `StableDiffusionXLControlNetImg2ImgPipeline`, and in one batched UNet call
requests with different ControlNets, scales or none each equal their own run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image

from shared.api.jobs import ControlInput, DenoiseJob
from shared.engine.sdxl import SDXLEngine
from shared.errors import InvalidRequestError
from shared.weights.builtin import resolve_builtin
from tests.unit.test_engine import diffusers_pixels, pixels, run
from tests.unit.test_engine_images import Model, _assert_equal, _picture


def _edges(width: int, height: int) -> np.ndarray:
    """A control map like a Canny result: white lines (a frame, a diagonal, a circle) on black."""
    y, x = np.mgrid[0:height, 0:width]
    lines = (x % 16 == 3) | (y == height // 3) | (np.abs(x - y) < 1)
    ring = np.abs(np.hypot(x - width / 2, y - height / 2) - min(width, height) / 4) < 1
    edges = np.where(lines | ring, 255, 0).astype(np.uint8)
    return np.repeat(edges[..., None], 3, axis=-1)


class Controlled:
    """The tiny model with the tiny ControlNet under two ids in our engine, and diffusers'."""

    def __init__(self, model: Model, path: Path) -> None:
        self.model = model
        self.controlnet = ControlNetModel.from_pretrained(path)
        base = model.engine
        self.engine = SDXLEngine(
            unet=base.unet,
            vae=base.vae_decoder.vae,
            scheduler_config=base.scheduler_config,
            controlnets={"edges": self.controlnet, "other": ControlNetModel.from_pretrained(path)},
        )

    def diffusers(self, kind: type, job: DenoiseJob, **inputs: object) -> np.ndarray:
        """diffusers' pipeline `kind` with the job's ControlNets: one as itself, several as a
        MultiControlNet with per-ControlNet scales and windows."""
        controls = job.controlnets
        models = [self.engine.controlnets.models[c.id] for c in controls]
        images = [Image.fromarray(c.image) for c in controls]
        one = len(controls) == 1

        def each(values: list[object]) -> object:
            return values[0] if one else values

        pipe = kind(**self.model.txt2img.components, controlnet=each(models))
        pipe.set_progress_bar_config(disable=True)
        image_arg = "image" if kind is StableDiffusionXLControlNetPipeline else "control_image"
        return diffusers_pixels(
            pipe,
            self.engine,
            self.model.tensors,
            job,
            **inputs,
            **{image_arg: each(images)},
            controlnet_conditioning_scale=each([c.scale for c in controls]),
            control_guidance_start=each([c.start for c in controls]),
            control_guidance_end=each([c.end for c in controls]),
        )


@pytest.fixture(scope="module")
def controlled(tiny_model_dir: Path) -> Controlled:
    return Controlled(Model(tiny_model_dir), resolve_builtin("tiny-controlnet"))


def _job(controlled: Controlled, **overrides: object) -> DenoiseJob:
    job = replace(controlled.model.job, **overrides)
    edges = _edges(job.width, job.height)
    return replace(job, controlnets=job.controlnets or [ControlInput("edges", edges)])


CASES = {
    "full": {},
    "scaled-window": {"scale": 0.6, "start": 0.2, "end": 0.8},
    "ancestral-two-seeds": {"scheduler": "euler_a", "seeds": [4, 5], "scale": 1.5},
    "no-cfg-dpmpp": {"scheduler": "dpmpp_2m", "guidance_scale": 1.0, "end": 0.5},
    "non-square": {"width": 96, "scale": 0.8},
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_one_controlnet_equals_diffusers(controlled: Controlled, case: dict[str, object]) -> None:
    control = {k: case[k] for k in ("scale", "start", "end") if k in case}
    job = _job(controlled, **{k: v for k, v in case.items() if k not in control})
    job = replace(job, controlnets=[replace(job.controlnets[0], **control)])
    result, events = run(controlled.engine, job)
    expected = controlled.diffusers(StableDiffusionXLControlNetPipeline, job)
    _assert_equal(pixels(result), expected)
    assert len(events) == job.steps


def test_two_controlnets_equal_diffusers_multicontrolnet(controlled: Controlled) -> None:
    job = _job(controlled, seeds=[6])
    picture = _picture(job.width, job.height)
    job = replace(
        job,
        controlnets=[
            ControlInput("edges", _edges(job.width, job.height), scale=0.7, end=0.7),
            ControlInput("other", picture, scale=0.5, start=0.3),
        ],
    )
    result, _ = run(controlled.engine, job)
    _assert_equal(pixels(result), controlled.diffusers(StableDiffusionXLControlNetPipeline, job))


def test_controlnet_with_img2img_equals_diffusers(controlled: Controlled) -> None:
    job = _job(controlled, strength=0.7, seeds=[7])
    image = _picture(job.width, job.height)
    job = replace(job, init_image=image)
    result, events = run(controlled.engine, job)
    expected = controlled.diffusers(
        StableDiffusionXLControlNetImg2ImgPipeline,
        job,
        image=Image.fromarray(image),
        strength=job.strength,
    )
    _assert_equal(pixels(result), expected)
    assert len(events) == int(job.steps * job.strength)


def test_the_controlnet_steers_the_image(controlled: Controlled) -> None:
    job = _job(controlled)
    with_control = pixels(run(controlled.engine, job)[0]).astype(int)
    without = pixels(run(controlled.engine, replace(job, controlnets=[]))[0]).astype(int)
    assert np.abs(with_control - without).mean() > 5
    zero = replace(job, controlnets=[replace(job.controlnets[0], scale=0.0)])
    assert np.array_equal(pixels(run(controlled.engine, zero)[0]), without.astype(np.uint8))


def test_one_unet_call_serves_requests_with_different_controlnets(controlled: Controlled) -> None:
    """One UNet call per step for all four; the ControlNet runs only on the rows that use it."""
    base = _job(controlled)
    edges = base.controlnets[0]
    jobs = [
        replace(base, id="plain", controlnets=[], seeds=[1]),
        replace(base, id="edges", seeds=[2]),
        replace(base, id="scaled", controlnets=[replace(edges, scale=0.4, start=0.5)], seeds=[3]),
        replace(base, id="other", controlnets=[replace(edges, id="other")], seeds=[4, 5]),
    ]
    alone = [pixels(run(controlled.engine, job)[0]) for job in jobs]
    engine = controlled.engine
    calls = {"unet": [], "edges": [], "other": []}
    hooks = [
        engine.unet.register_forward_hook(lambda m, a, o: calls["unet"].append(a[0].shape[0])),
        *(
            engine.controlnets.models[name].register_forward_hook(
                lambda m, a, o, name=name: calls[name].append(a[0].shape[0])
            )
            for name in ("edges", "other")
        ),
    ]
    try:
        states = [engine.prepare(job) for job in jobs]
        while not states[0].finished:
            engine.step(states)
        together = engine.decode(states)
    finally:
        for hook in hooks:
            hook.remove()
    for outcome, expected in zip(together, alone, strict=True):
        assert not isinstance(outcome, Exception)
        assert np.array_equal(pixels(outcome), expected)
    steps = base.steps
    assert calls["unet"] == [2 * 5] * steps  # five images, guidance doubles the rows
    # "edges" serves two requests' rows until "scaled"'s window opens halfway, then three.
    assert calls["edges"] == [2] * (steps // 2) + [4] * (steps - steps // 2)
    assert calls["other"] == [4] * steps


def test_an_unknown_controlnet_or_a_map_of_the_wrong_size_is_refused(
    controlled: Controlled,
) -> None:
    job = _job(controlled)
    with pytest.raises(InvalidRequestError) as unknown:
        unknown_id = [ControlInput("nope", job.controlnets[0].image)]
        controlled.engine.check(replace(job, controlnets=unknown_id))
    assert unknown.value.code == "unknown_controlnet"
    assert unknown.value.param == "controlnet.0.id"
    small = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(InvalidRequestError) as size:
        controlled.engine.check(replace(job, controlnets=[ControlInput("edges", small)]))
    assert size.value.param == "controlnet.0.image"
    assert torch.is_tensor(controlled.engine.controlnets.models["edges"].conv_in.weight)

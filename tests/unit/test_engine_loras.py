"""Per-request LoRAs in SDXLEngine and the step batcher, against diffusers' `load_lora_weights` +
`set_adapters` on the tiny model with the built-in tiny LoRAs (diffusers/PEFT and kohya keys):
same pixels for one LoRA, two with scales, and scale 0; requests with different LoRA sets never
share a UNet call, and each still gets the image it gets alone."""

from __future__ import annotations

import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from shared.api.jobs import DenoiseJob, PromptEmbeddings
from shared.api.schemas import ResultEvent
from shared.engine.batcher import StepBatcher
from shared.engine.sdxl import SDXLEngine
from shared.errors import InvalidRequestError
from shared.weights.builtin import resolve_builtin
from tests.unit.test_engine import diffusers_pixels, pixels, run
from tests.unit.test_engine_images import _tensors

LORAS = {"style": "tiny-lora", "kohya": "tiny-lora-kohya"}


def _weights_file(name: str) -> Path:
    (path,) = sorted(resolve_builtin(name).glob("*.safetensors"))
    return path


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    for lora_id, name in LORAS.items():
        path = _weights_file(name)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=lora_id)
    return pipe


def _engine(path: Path) -> SDXLEngine:
    """The tiny model's engine with both LoRAs configured (none loaded yet)."""
    plain = SDXLEngine.from_pretrained_dir(path)
    sources = {lora_id: partial(load_file, _weights_file(name)) for lora_id, name in LORAS.items()}
    return SDXLEngine(
        plain.unet,
        plain.vae_decoder.vae,
        plain.scheduler_config,
        preview_decoder=None,
        loras=sources,
    )


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> SDXLEngine:
    return _engine(tiny_model_dir)


@pytest.fixture(scope="module")
def job(pipe: StableDiffusionXLPipeline) -> DenoiseJob:
    tensors = _tensors(pipe)
    return DenoiseJob(
        id="job",
        model="tiny",
        embeddings=PromptEmbeddings(**{k: v.numpy() for k, v in tensors.items()}),
        width=64,
        height=64,
        steps=5,
        guidance_scale=5.0,
        seeds=[7],
    )


def _diffusers(pipe: StableDiffusionXLPipeline, engine: SDXLEngine, job: DenoiseJob) -> np.ndarray:
    # In the engine's order (by id): PEFT sums the adapters' outputs in the order they are
    # activated, and on random tiny weights float rounding is visible in the pixels.
    active = sorted(job.loras)
    if active:
        pipe.enable_lora()
        pipe.set_adapters([i for i, _ in active], adapter_weights=[s for _, s in active])
    else:
        pipe.disable_lora()
    return diffusers_pixels(pipe, engine, _tensors(pipe), job)


CASES = {
    "diffusers-format": (("style", 1.0),),
    "kohya-format": (("kohya", 0.8),),
    "two-with-scales": (("style", 0.5), ("kohya", 1.2)),
    "none": (),
}


@pytest.mark.parametrize("loras", CASES.values(), ids=CASES.keys())
def test_loras_equal_diffusers_load_lora_weights_and_set_adapters(
    pipe: StableDiffusionXLPipeline, engine: SDXLEngine, job: DenoiseJob, loras: tuple
) -> None:
    lora_job = replace(job, loras=loras)
    result, _ = run(engine, lora_job)
    expected = _diffusers(pipe, engine, lora_job)
    ours = pixels(result)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    if loras:
        plain, _ = run(engine, job)
        assert not np.array_equal(ours, pixels(plain)), "the LoRA must change the image"


def test_scale_zero_is_exactly_the_image_without_the_lora(
    engine: SDXLEngine, job: DenoiseJob
) -> None:
    plain, _ = run(engine, job)
    zero, _ = run(engine, replace(job, loras=(("style", 0.0),)))
    assert zero.images[0].b64 == plain.images[0].b64


def test_unknown_lora_is_refused_before_any_step(engine: SDXLEngine, job: DenoiseJob) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.check(replace(job, loras=(("nope", 1.0),)))
    assert caught.value.code == "unknown_lora" and caught.value.param == "loras"


class _Sink:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: object = None

    def queued(self, event: object) -> None: ...

    def step(self, event: object, batch_requests: int) -> None: ...

    def finish(self, outcome: object) -> None:
        self.outcome = outcome
        self.done.set()

    def cancelled(self) -> bool:
        return False


def test_the_batcher_never_mixes_lora_sets_in_one_unet_call(
    engine: SDXLEngine, job: DenoiseJob
) -> None:
    sets = [(), (("style", 1.0),), (("style", 0.5), ("kohya", 1.0)), (("style", 1.0),), ()]
    jobs = [replace(job, id=f"j{i}", loras=s, seeds=[i]) for i, s in enumerate(sets)]
    alone = {j.id: pixels(run(engine, j)[0]) for j in jobs}
    calls: list[list[tuple]] = []
    original = engine._denoise_step

    def recording(states: list) -> list:
        calls.append([state.lora_set for state in states])
        return original(states)

    engine._denoise_step = recording  # type: ignore[method-assign]
    batcher = StepBatcher(max_batch_images=8)
    try:
        sinks = []
        for lora_job in jobs:
            sink = _Sink()
            batcher.submit(engine, lora_job, sink)
            sinks.append(sink)
        for sink in sinks:
            assert sink.done.wait(120)
    finally:
        batcher.close()
        del engine._denoise_step
    assert all(len(set(call)) == 1 for call in calls), calls
    assert max(len(call) for call in calls) == 2, "the two requests of each set share calls"
    for lora_job, sink in zip(jobs, sinks, strict=True):
        assert isinstance(sink.outcome, ResultEvent)
        diff = np.abs(pixels(sink.outcome).astype(int) - alone[lora_job.id].astype(int))
        assert diff.max() <= 1, lora_job.loras


def test_adapters_beyond_the_cap_are_evicted_least_recently_used_first(
    tiny_model_dir: Path, job: DenoiseJob
) -> None:
    engine = _engine(tiny_model_dir)
    engine.loras.max_loaded = 1
    first, _ = run(engine, replace(job, loras=(("style", 1.0),)))
    run(engine, replace(job, loras=(("kohya", 1.0),)))
    assert list(engine.loras.loaded) == ["kohya"]
    again, _ = run(engine, replace(job, loras=(("style", 1.0),)))
    assert list(engine.loras.loaded) == ["style"]
    assert again.images[0].b64 == first.images[0].b64  # reloaded, same pixels
    with pytest.raises(InvalidRequestError):  # a set larger than the cap is refused up front
        engine.check(replace(job, loras=(("style", 1.0), ("kohya", 1.0))))

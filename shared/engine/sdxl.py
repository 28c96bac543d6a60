"""The SDXL denoising engine: prepare → step → decode, on injected modules.

It reproduces diffusers' `StableDiffusionXLPipeline` text-to-image path step for step (same
noise, same scheduler calls, same VAE postprocessing), so its pixels equal diffusers' for the
same inputs, but it owns the loop: a `StepEvent` after every step, previews every k steps,
cooperative cancellation before every step.

A request's state between steps is a `Denoising` (its own scheduler, timesteps, latents,
generators, conditioning and guidance). `step` advances any number of same-size states with one
UNet forward (per-sample timesteps, stacked conditioning), then each state's own scheduler step,
so requests with different samplers, step counts, seeds and guidance share a call; `decode`
finishes several states with one VAE call. `run` is the one-request loop over the same three
calls; `shared.engine.batcher.StepBatcher` is the many-request one. Everything is synchronous:
deployments run it in a worker thread. Modules are passed in built, so the production path can
load them from the object store and tests can pass the tiny model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from shared.api.jobs import DenoiseJob, LoraSet, PromptEmbeddings, lora_set
from shared.api.schemas import GeneratedImage, ResultEvent, StepEvent, Timings
from shared.api.vocabulary import (
    IMAGE_FORMATS,
    PREVIEW_KINDS,
    PreviewKind,
)
from shared.engine.controlnets import Control, ControlNets, ControlRows
from shared.engine.image_inputs import (
    ImageLatents,
    Inpainting,
    NoiseInjector,
    injection_generators,
    latent_mask,
    mask_to_tensor,
    noise_level,
    pixels_to_tensor,
    start_latents,
)
from shared.engine.ip_adapter import (
    has_ip_adapter,
    image_embeds_dim,
    image_prompt_rows,
    set_row_scales,
)
from shared.engine.loras import LoraAdapters
from shared.engine.previews import (
    LatentRGBDecoder,
    PreviewDecoder,
    TinyVAEDecoder,
    VAEDecoder,
    place_module,
    render_previews,
    to_pixels,
)
from shared.engine.refiner import Refiner, base_steps, refiner_start, time_ids
from shared.engine.samplers import build_scheduler, step_kwargs
from shared.errors import (
    GenerationError,
    InvalidRequestError,
    RequestCancelledError,
    ServeError,
)
from shared.imaging import encode_image, to_pil

StepHook = Callable[[StepEvent], None]
logger = logging.getLogger(__name__)
LATENT_CHANNELS = 4  # SDXL's VAE; a 9-channel inpainting UNet adds mask + masked-image latents


@dataclass
class Conditioning:
    """UNet conditioning for a batch, negatives first when guidance is on (diffusers' order)."""

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    guidance_scale: float

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass
class Sampling:
    """Per-job sampler state: the scheduler, its timesteps and the per-image generators."""

    scheduler: SchedulerMixin
    timesteps: torch.Tensor
    generators: list[torch.Generator]
    step_kwargs: dict[str, Any]


@dataclass
class Stage:
    """The refiner's part of a job, set up with the job and waiting for the base to finish."""

    sampling: Sampling
    conditioning: Conditioning


@dataclass
class Denoising:
    """One request between steps. `done` counts finished steps (of all stages); `rows` is its
    share of a UNet batch (its images, twice with classifier-free guidance). A job with a
    refiner runs `stage` "base" until its base timesteps are done, then "refiner" with the
    `handoff`'s sampling and conditioning on the same latents."""

    job: DenoiseJob
    sampling: Sampling
    conditioning: Conditioning
    latents: torch.Tensor
    previewer: PreviewDecoder | None
    inpainting: Inpainting | None = None
    injector: NoiseInjector | None = None
    controls: list[Control] = field(default_factory=list)
    handoff: Stage | None = None
    stage: str = "base"
    stage_start: int = 0  # steps done before the current stage
    done: int = 0
    started: float = 0.0  # perf_counter at its first step
    denoise_ms: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    preview_failures: int = 0  # previews that could not be made (and were dropped)

    @property
    def total(self) -> int:
        pending = len(self.handoff.sampling.timesteps) if self.handoff is not None else 0
        return self.stage_start + len(self.sampling.timesteps) + pending

    @property
    def index(self) -> int:
        """The step within the current stage's timesteps."""
        return self.done - self.stage_start

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def rows(self) -> int:
        return self.latents.shape[0] * (2 if self.conditioning.uses_cfg else 1)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width): requests of one size can share a UNet call."""
        return self.job.height, self.job.width

    @property
    def lora_set(self) -> LoraSet:
        """The LoRAs its UNet calls run with: requests share a call only with the same set."""
        return lora_set(self.job.loras) if self.stage == "base" else ()

    @property
    def group(self) -> tuple[tuple[int, int], str, LoraSet]:
        """What it shares a UNet call by: size, the UNet (base or refiner) and the LoRA set."""
        return self.size, self.stage, self.lora_set


class SDXLEngine:
    """Runs DenoiseJobs on one device with the modules it is given."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler_config: dict[str, Any],
        preview_decoder: AutoencoderTiny | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        loras: dict[str, Callable[[], dict[str, torch.Tensor]]] | None = None,
        controlnets: dict[str, ControlNetModel] | None = None,
        refiner_unet: UNet2DConditionModel | None = None,
        refiner_scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = place_module(unet, self.device, dtype)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scheduler_config = dict(scheduler_config)
        build_scheduler(None, self.scheduler_config)  # a bad config fails here, not per request
        self.vae_decoder = VAEDecoder(vae, self.device)
        self.image_latents = ImageLatents(self.vae_decoder, dtype)
        # A 9-channel UNet is an inpainting checkpoint: mask and masked-image latents are inputs.
        self.inpainting_unet = self.unet.config.in_channels == 9
        self.ip_adapter = has_ip_adapter(self.unet)
        self.image_embeds_dim = image_embeds_dim(self.unet) if self.ip_adapter else 0
        self.loras = LoraAdapters(self.unet, loras or {})
        self.controlnets = ControlNets(controlnets or {}, self.device, dtype)
        self.refiner = (
            Refiner.place(refiner_unet, refiner_scheduler_config or {}, self.device, dtype)
            if refiner_unet is not None
            else None
        )
        tiny = (
            TinyVAEDecoder(preview_decoder, self.device, dtype)
            if preview_decoder is not None
            else None
        )
        self.previewers: dict[PreviewKind, PreviewDecoder | None] = {
            "latent": LatentRGBDecoder(),
            "tiny": tiny,
            "full": self.vae_decoder,
        }

    @classmethod
    def from_pretrained_dir(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SDXLEngine:
        """Load unet/vae/scheduler (and `taesd/` when present) from a diffusers folder."""
        path = Path(path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        taesd = None
        if (path / "taesd" / "config.json").is_file():
            taesd = AutoencoderTiny.from_pretrained(path / "taesd", torch_dtype=dtype)
        return cls(unet, vae, config, preview_decoder=taesd, device=device, dtype=dtype)

    def run(self, job: DenoiseJob, emit: StepHook, cancelled: Callable[[], bool]) -> ResultEvent:
        """Generate the job's images alone; `emit` gets a StepEvent after each step.

        Everything a request can get wrong is checked before the first step, so a stream never
        fails mid-way on bad input.
        """
        state = self.prepare(job)
        while not state.finished:
            _raise_if_cancelled(job, cancelled)
            (event,) = self.step([state])
            if isinstance(event, ServeError):
                raise event
            emit(event)
        _raise_if_cancelled(job, cancelled)
        (outcome,) = self.decode([state])
        if isinstance(outcome, ServeError):
            raise outcome
        return outcome

    def warm_up(self, width: int, height: int) -> None:
        """One step and one decode at this size on zero embeddings, so the first request does
        not pay the first forward's one-time costs (kernel selection, allocations)."""
        config = self.unet.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        text = np.zeros((1, 77, config.cross_attention_dim), dtype=np.float32)
        zeros = np.zeros((1, pooled), dtype=np.float32)
        job = DenoiseJob(
            id="warm-up",
            model="warm-up",
            embeddings=PromptEmbeddings(text, zeros, text, zeros),
            width=width,
            height=height,
            steps=1,
            guidance_scale=5.0,
            seeds=[0],
        )
        self.run(job, lambda _: None, lambda: False)

    def check(self, job: DenoiseJob) -> None:
        """Raise InvalidRequestError for anything this engine cannot run (size, sampler,
        preview, format): cheap, so callers check before queueing the job."""
        self._check_job(job)
        self._previewer(job.preview)
        build_scheduler(job.scheduler, self.scheduler_config)
        self.loras.check(lora_set(job.loras))

    def prepare(self, job: DenoiseJob) -> Denoising:
        """Check the job and set up its sampler, conditioning and initial latents."""
        self._check_job(job)
        previewer = self._previewer(job.preview)
        scheduler = build_scheduler(job.scheduler, self.scheduler_config)
        with torch.inference_mode():
            conditioning = self._conditioning(job)
            sampling = self._sampling(job, scheduler)
            latents, inpainting = self._initial_latents(job, sampling)
            injector = self._injector(job)
            controls = self.controlnets.prepare(job, conditioning.uses_cfg)
            handoff = self._handoff(job, sampling) if job.refiner is not None else None
        return Denoising(
            job,
            sampling,
            conditioning,
            latents,
            previewer,
            inpainting=inpainting,
            injector=injector,
            controls=controls,
            handoff=handoff,
        )

    def step(self, states: list[Denoising]) -> list[StepEvent | ServeError]:
        """Advance every state by one step with a single UNet forward; one outcome per state.

        The states must share a size (`Denoising.size`); each keeps its own sampler, timestep,
        guidance and generators, so the result of each equals its own step run alone. A state
        whose sampler step fails or whose latents are not finite gets its error (it can only end
        in a NaN image) without failing the others; a preview that cannot be made is dropped.
        Nothing of any state changes before the UNet call returns, so a call that raises (out
        of memory) can be retried with the same states.
        """
        if len({state.group for state in states}) != 1:
            raise ValueError("states of one UNet call must share a size, a UNet and a LoRA set")
        started = time.perf_counter()
        if states[0].stage == "base":
            # Adapters load (once) here, on the batcher's thread between UNet calls.
            self.loras.ensure(states[0].lora_set)
            self.loras.activate(states[0].lora_set)
        with torch.inference_mode():
            outputs = self._denoise_step(states)
            finite = _all_finite([o[0] if isinstance(o, tuple) else None for o in outputs])
            self._synchronize()
        step_ms = (time.perf_counter() - started) * 1000
        outcomes: list[StepEvent | ServeError] = []
        for state, output, ok in zip(states, outputs, finite, strict=True):
            if not isinstance(output, tuple):
                outcomes.append(output)
                continue
            if not ok:
                outcomes.append(_nan_latents(state))
                continue
            latents, predicted = output
            if state.done == 0:
                state.started = started
            state.latents = latents
            state.done += 1
            state.denoise_ms = (time.perf_counter() - state.started) * 1000
            outcomes.append(self._event(state, predicted, step_ms))
            if state.handoff is not None and state.index >= len(state.sampling.timesteps):
                _hand_over(state)
        return outcomes

    def decode(self, states: list[Denoising]) -> list[ResultEvent | ServeError]:
        """Finish states with one VAE call; a state whose pixels are not finite gets its error
        (a NaN image is never a success) without failing the others."""
        started = time.perf_counter()
        with torch.inference_mode():
            decoded = self.vae_decoder.decode(torch.cat([state.latents for state in states]))
        decode_ms = (time.perf_counter() - started) * 1000
        outcomes: list[ResultEvent | ServeError] = []
        offset = 0
        for state in states:
            count = state.latents.shape[0]
            try:
                pixels = to_pixels(decoded[offset : offset + count])
            except ServeError as error:
                outcomes.append(error)
            else:
                outcomes.append(self._result(state, pixels, decode_ms))
            offset += count
        return outcomes

    def _check_job(self, job: DenoiseJob) -> None:
        factor = self.vae_scale_factor
        for name, value in (("width", job.width), ("height", job.height)):
            if value <= 0 or value % factor:
                raise InvalidRequestError(
                    f"{name} must be a positive multiple of {factor}; got {value}", param=name
                )
        if job.steps < 1:
            raise InvalidRequestError(f"steps must be at least 1; got {job.steps}", param="steps")
        if not job.seeds:
            raise InvalidRequestError("at least one seed (one image) is required", param="n")
        if job.output_format not in IMAGE_FORMATS:
            raise InvalidRequestError(
                f"output_format must be one of {', '.join(IMAGE_FORMATS)}; "
                f"got {job.output_format!r}",
                param="output_format",
            )
        if job.preview_every < 1 or job.preview_max_side < 1:
            raise InvalidRequestError(
                "preview_every and preview_max_side must be at least 1", param="preview_every"
            )
        self._check_images(job)
        self.controlnets.check(job)
        if job.refiner is not None:
            self._check_refiner(job)

    def _check_refiner(self, job: DenoiseJob) -> None:
        if self.refiner is None:
            raise InvalidRequestError(
                f"model {job.model!r} has no refiner configured",
                code="refiner_unsupported",
                param="refiner",
            )
        if job.mask is not None or self.inpainting_unet:
            raise InvalidRequestError(
                "a refiner cannot finish an inpainting job; drop `refiner` or `mask`",
                code="refiner_unsupported",
                param="refiner",
            )
        sampling = self._sampling(job, build_scheduler(job.scheduler, self.scheduler_config))
        base = len(self._base_timesteps(job, sampling))
        refined = len(self._refiner_sampling(job, sampling.generators).timesteps)
        if base < 1 or refined < 1:
            switch_at = job.refiner.switch_at if job.refiner is not None else None
            raise InvalidRequestError(
                f"switch_at {switch_at} leaves the "
                f"{'base' if base < 1 else 'refiner'} no step of this job's schedule "
                f"({base} base, {refined} refiner steps); move it toward 0.5",
                param="refiner.switch_at",
            )

    def _check_images(self, job: DenoiseJob) -> None:
        size = (job.height, job.width)
        arrays = {
            "init_image": (job.init_image, 3),
            "mask": (job.mask, 2),
            "start_image": (job.start_image, 3),
            "noise_mask": (job.noise_mask.mask if job.noise_mask else None, 2),
        }
        for name, (array, ndim) in arrays.items():
            if array is not None and (array.ndim != ndim or array.shape[:2] != size):
                raise InvalidRequestError(
                    f"{name} must be {job.width}x{job.height} pixels at this point; got an array "
                    f"of shape {array.shape}",
                    param=name,
                )
        if job.init_image is not None and _kept_steps(job) < 1:
            raise InvalidRequestError(
                f"strength {job.strength} with {job.steps} steps runs no step: "
                "int(steps * strength) must be at least 1",
                param="strength",
            )
        if job.image_embeds is not None:
            if not self.ip_adapter:
                raise InvalidRequestError(
                    f"model {job.model!r} has no IP-Adapter configured, so it takes no "
                    "image_prompt",
                    code="image_prompt_unsupported",
                    param="image_prompt",
                )
            if np.asarray(job.image_embeds).size != self.image_embeds_dim:
                raise InvalidRequestError(
                    f"image embeddings must have {self.image_embeds_dim} values; got "
                    f"{np.asarray(job.image_embeds).size}",
                    param="image_prompt",
                )

    def _previewer(self, kind: PreviewKind) -> PreviewDecoder | None:
        if kind == "none":
            return None
        if kind not in self.previewers:
            raise InvalidRequestError(
                f"preview must be one of {', '.join(PREVIEW_KINDS)}; got {kind!r}", param="preview"
            )
        previewer = self.previewers[kind]
        if previewer is None:
            raise InvalidRequestError(
                f"preview {kind!r} is not available for this model (no tiny autoencoder loaded); "
                "use 'latent' or 'full'",
                code="preview_unavailable",
                param="preview",
            )
        return previewer

    # -- prepare ---------------------------------------------------------------------------

    def _conditioning(self, job: DenoiseJob) -> Conditioning:
        """Embeddings repeated per image, CFG-concatenated, with SDXL's size micro-conditioning."""
        count = len(job.seeds)
        embeddings = job.embeddings
        prompt = self._batch(embeddings.prompt_embeds, count)
        pooled = self._batch(embeddings.pooled_prompt_embeds, count)
        # original_size, crops_coords_top_left, target_size: diffusers' defaults for text-to-image.
        time_ids = torch.tensor(
            [[job.height, job.width, 0, 0, job.height, job.width]], dtype=self.dtype
        )
        if job.guidance_scale > 1.0:
            negative = self._batch(embeddings.negative_prompt_embeds, count)
            negative_pooled = self._batch(embeddings.negative_pooled_prompt_embeds, count)
            prompt = torch.cat([negative, prompt])
            pooled = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        time_ids = time_ids.to(self.device).repeat(count, 1)
        return Conditioning(prompt, pooled, time_ids, job.guidance_scale)

    def _batch(self, array: np.ndarray, count: int) -> torch.Tensor:
        if array.shape[0] != 1:
            raise ValueError(f"embeddings must have batch dimension 1; got shape {array.shape}")
        # torch.tensor copies: arrays from the object store are read-only.
        tensor = torch.tensor(np.asarray(array), device=self.device).to(self.dtype)
        return tensor.repeat_interleave(count, dim=0)

    def _sampling(self, job: DenoiseJob, scheduler: SchedulerMixin) -> Sampling:
        """The job's timesteps: all of them, or with an init image the last `strength` of them
        (diffusers' `get_timesteps`: the first 1 - strength of the schedule is skipped)."""
        scheduler.set_timesteps(job.steps, device=self.device)
        skipped = job.steps - _kept_steps(job) if job.init_image is not None else 0
        begin = skipped * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]
        return Sampling(
            scheduler, scheduler.timesteps[begin:], generators, step_kwargs(scheduler, generators)
        )

    def _base_timesteps(self, job: DenoiseJob, sampling: Sampling) -> torch.Tensor:
        """The base's timesteps: with a refiner, those before the handoff (`denoising_end`)."""
        if job.refiner is None:
            return sampling.timesteps
        kept = base_steps(sampling.timesteps, sampling.scheduler, job.refiner.switch_at)
        return sampling.timesteps[:kept]

    def _handoff(self, job: DenoiseJob, sampling: Sampling) -> Stage:
        """Cut the base's schedule at the handoff and set up the refiner's stage."""
        sampling.timesteps = self._base_timesteps(job, sampling)
        return Stage(
            self._refiner_sampling(job, sampling.generators), self._refiner_conditioning(job)
        )

    def _refiner_sampling(self, job: DenoiseJob, generators: list[torch.Generator]) -> Sampling:
        """The refiner's scheduler (the job's sampler on the refiner's config) from the handoff
        on (`denoising_start`), drawing from the job's generators where the base left them."""
        assert self.refiner is not None and job.refiner is not None
        scheduler = build_scheduler(job.scheduler, self.refiner.scheduler_config)
        scheduler.set_timesteps(job.steps, device=self.device)
        start = refiner_start(scheduler, job.refiner.switch_at)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        kwargs = step_kwargs(scheduler, generators)
        return Sampling(scheduler, scheduler.timesteps[start:], generators, kwargs)

    def _refiner_conditioning(self, job: DenoiseJob) -> Conditioning:
        """Text encoder 2's part of the prompt embeddings and the aesthetic time ids."""
        assert self.refiner is not None and job.refiner is not None
        handoff, count = job.refiner, len(job.seeds)
        embeddings = handoff.embeddings or job.embeddings
        features = self.refiner.text_features
        prompt = self._batch(embeddings.prompt_embeds[..., -features:], count)
        pooled = self._batch(embeddings.pooled_prompt_embeds, count)
        cfg = job.guidance_scale > 1.0
        if cfg:
            negative = self._batch(embeddings.negative_prompt_embeds[..., -features:], count)
            negative_pooled = self._batch(embeddings.negative_pooled_prompt_embeds, count)
            prompt = torch.cat([negative, prompt])
            pooled = torch.cat([negative_pooled, pooled])
        scores = handoff.aesthetic_score, handoff.negative_aesthetic_score
        ids = time_ids(job.height, job.width, *scores, count, cfg)
        return Conditioning(prompt, pooled, ids.to(self.device, self.dtype), job.guidance_scale)

    def _initial_latents(
        self, job: DenoiseJob, sampling: Sampling
    ) -> tuple[torch.Tensor, Inpainting | None]:
        """The latents the loop starts from, drawing from the per-image generators in
        diffusers' order: noise alone (text to image), the start image mixed with noise, the
        init image's latents noised to the first kept timestep (img2img), or inpainting's."""
        shape = (
            len(job.seeds),
            LATENT_CHANNELS,
            job.height // self.vae_scale_factor,
            job.width // self.vae_scale_factor,
        )
        generators = sampling.generators
        scheduler = sampling.scheduler
        if job.mask is not None or self.inpainting_unet:
            return self._inpainting_latents(job, sampling, shape)
        if job.start_image is not None:
            sigma = float(scheduler.init_noise_sigma)
            return start_latents(job, self.image_latents, generators, shape, sigma), None
        if job.init_image is not None:
            image = pixels_to_tensor(job.init_image, self.device)
            latents = self.image_latents.encode_each(image, generators)
            noise = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
            first = sampling.timesteps[:1].repeat(len(job.seeds))
            return scheduler.add_noise(latents, noise, first), None
        noise = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        return noise * scheduler.init_noise_sigma, None

    def _inpainting_latents(
        self, job: DenoiseJob, sampling: Sampling, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, Inpainting]:
        """`StableDiffusionXLInpaintPipeline`'s start, generator draw for generator draw.

        Without a mask (a 9-channel model asked for text to image or img2img) the whole image
        is repainted, as diffusers does with an all-white mask. Like diffusers, the image and
        the masked image are each encoded once with the first image's generator.
        """
        count, generators, scheduler = len(job.seeds), sampling.generators, sampling.scheduler
        height, width = job.height, job.width
        # No init image: a black one, as a caller of diffusers' pipeline would pass (the mask
        # repaints all of it, so only its layout and its -1 values reach the VAE).
        black = np.zeros((height, width, 3), dtype=np.uint8)
        pixels = job.init_image if job.init_image is not None else black
        image = pixels_to_tensor(pixels, self.device)
        mask = (
            mask_to_tensor(job.mask, self.device)
            if job.mask is not None
            else torch.ones((1, 1, height, width), device=self.device)
        )
        full_strength = job.init_image is None or job.strength == 1.0
        image_latents = None
        if not self.inpainting_unet or not full_strength:
            image_latents = self.image_latents.encode(image, generators[0]).repeat(count, 1, 1, 1)
        noise = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        if full_strength:
            latents = noise * scheduler.init_noise_sigma
        else:
            assert image_latents is not None
            first = sampling.timesteps[:1].repeat(count)
            latents = scheduler.add_noise(image_latents, noise, first)
        small_mask = F.interpolate(mask, size=shape[-2:]).to(self.dtype).repeat(count, 1, 1, 1)
        masked = image * (mask < 0.5)
        if self.inpainting_unet:
            masked_latents = self.image_latents.encode(masked, generators[0])
            return latents, Inpainting(
                small_mask, masked_latents.repeat(count, 1, 1, 1), None, None
            )
        # diffusers encodes the masked image here even for a 4-channel UNet, which only moves
        # the first generator on; draw the same numbers so ancestral samplers stay equal.
        randn_tensor((1, *shape[1:]), generator=generators[0], device=self.device)
        return latents, Inpainting(small_mask, None, image_latents, noise)

    def _injector(self, job: DenoiseJob) -> NoiseInjector | None:
        spec = job.noise_mask
        if spec is None or spec.strength == 0:
            return None
        size = (job.height // self.vae_scale_factor, job.width // self.vae_scale_factor)
        return NoiseInjector(
            mask=latent_mask(spec.mask, size, self.device).to(self.dtype),
            strength=spec.strength,
            start=spec.start,
            end=spec.end,
            generators=injection_generators(job.seeds),
        )

    # -- denoise ---------------------------------------------------------------------------

    def _denoise_step(self, states: list[Denoising]) -> list[tuple[torch.Tensor, Any] | ServeError]:
        """One UNet call for every state, then each state's own guidance, scheduler step and
        corrections (inpainting's blend, injected noise); also returns each scheduler's x0
        prediction (when it makes one), which previews far better than the still-noisy
        latents. A state whose own part fails gets its error in place of its output."""
        inputs, control_inputs, timesteps, rows = [], [], [], []
        offset = 0
        for state in states:
            scheduler = state.sampling.scheduler
            timestep = state.sampling.timesteps[state.index]
            latents = state.latents
            cfg = state.conditioning.uses_cfg
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            # ControlNets take the latents alone, before inpainting's extra input channels.
            control_inputs.append(model_input)
            rows.append(ControlRows(offset, state.controls, state.done, state.total))
            offset += model_input.shape[0]
            if state.inpainting is not None:
                model_input = state.inpainting.unet_input(model_input, cfg)
            inputs.append(model_input)
            # One timestep per row; float like the UNet's own time projection, so integer
            # (DDIM) and float (Euler) timesteps can share a call.
            timesteps.append(timestep.float().expand(model_input.shape[0]))
        added = {
            "text_embeds": torch.cat([s.conditioning.text_embeds for s in states]),
            "time_ids": torch.cat([s.conditioning.time_ids for s in states]),
        }
        refining = states[0].stage == "refiner"
        image_prompts = self.ip_adapter and not refining
        if image_prompts:
            embeds, scales = self._image_prompt_rows(states)
            set_row_scales(self.unet, scales)
        prompt_embeds = torch.cat([s.conditioning.prompt_embeds for s in states])
        all_timesteps = torch.cat(timesteps)
        residuals = self.controlnets.residuals(
            rows, torch.cat(control_inputs), all_timesteps, prompt_embeds, added
        )
        if image_prompts:
            added = {**added, "image_embeds": [embeds]}
        unet = self.refiner.unet if refining and self.refiner is not None else self.unet
        noise = unet(
            torch.cat(inputs),
            all_timesteps,
            encoder_hidden_states=prompt_embeds,
            timestep_cond=None,
            added_cond_kwargs=added,
            down_block_additional_residuals=residuals[0] if residuals else None,
            mid_block_additional_residual=residuals[1] if residuals else None,
            return_dict=False,
        )[0]
        outputs: list[tuple[torch.Tensor, Any] | ServeError] = []
        offset = 0
        for state in states:
            own = noise[offset : offset + state.rows]
            offset += state.rows
            try:
                outputs.append(self._scheduler_step(state, own))
            except Exception:  # one request's sampler never fails the others of the call
                logger.exception("the sampler step of request %s failed", state.job.id)
                outputs.append(ServeError(f"the sampler step of request {state.job.id} failed"))
        return outputs

    def _scheduler_step(self, state: Denoising, noise: torch.Tensor) -> tuple[torch.Tensor, Any]:
        conditioning, sampling = state.conditioning, state.sampling
        if conditioning.uses_cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + conditioning.guidance_scale * (text - uncond)
        timestep = sampling.timesteps[state.index]
        output = sampling.scheduler.step(
            noise, timestep, state.latents, **sampling.step_kwargs, return_dict=True
        )
        latents = output.prev_sample
        done, index = state.done + 1, state.index + 1
        following = sampling.timesteps[index] if index < len(sampling.timesteps) else None
        if state.inpainting is not None:
            latents = state.inpainting.blend(latents, sampling.scheduler, following)
        injector = state.injector
        if injector is not None and following is not None and injector.active(done, state.total):
            latents = injector.apply(latents, noise_level(sampling.scheduler, following))
        return latents, getattr(output, "pred_original_sample", None)

    def _image_prompt_rows(self, states: list[Denoising]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per UNet row an image embedding and an adapter scale, in each request's own rows:
        its image prompt (zeros on its unconditional rows, as diffusers), or zeros at scale 0
        for a request without one."""
        embeds, scales = [], []
        for state in states:
            job = state.job
            embedding = None
            if job.image_embeds is not None:
                embedding = torch.tensor(np.asarray(job.image_embeds), device=self.device)
            rows = image_prompt_rows(
                embedding,
                job.image_prompt_scale,
                state.latents.shape[0],
                state.conditioning.uses_cfg,
                self.image_embeds_dim,
                self.device,
                self.dtype,
            )
            embeds.append(rows[0])
            scales.append(rows[1])
        return torch.cat(embeds), torch.cat(scales)

    def _event(self, state: Denoising, predicted: torch.Tensor | None, step_ms: float) -> StepEvent:
        job, index = state.job, state.done
        previews = []
        if state.previewer is not None and (index % job.preview_every == 0 or state.finished):
            shown = predicted if predicted is not None else state.latents
            try:
                previews = render_previews(
                    state.previewer, shown, (job.width, job.height), job.preview_max_side
                )
            except Exception as exc:  # a preview is best-effort: this one is dropped
                state.preview_failures += 1
                if state.preview_failures == 1:  # once per request, not once per step
                    logger.warning(
                        "dropped a preview of request %s (later ones are dropped silently): %r",
                        job.id,
                        exc,
                    )
        return StepEvent(
            id=job.id,
            index=index,
            total=state.total,
            elapsed_ms=(time.perf_counter() - state.started) * 1000,
            step_ms=step_ms,
            previews=previews,
        )

    def _synchronize(self) -> None:
        # CUDA runs ahead of Python: without a sync, step timings and the cancellation check
        # would describe queued work rather than finished work.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- decode ----------------------------------------------------------------------------

    def _result(self, state: Denoising, pixels: np.ndarray, decode_ms: float) -> ResultEvent:
        job = state.job
        return ResultEvent(
            id=job.id,
            model=job.model,
            backend="local",
            images=self._encode_images(job, pixels),
            timings=_timings(job, state.denoise_ms, decode_ms),
        )

    def _encode_images(self, job: DenoiseJob, pixels: np.ndarray) -> list[GeneratedImage]:
        images = []
        for array, seed in zip(pixels, job.seeds, strict=True):
            img = to_pil(array)
            images.append(
                GeneratedImage(
                    b64=encode_image(img, job.output_format),
                    format=job.output_format,
                    width=img.width,
                    height=img.height,
                    seed=seed,
                )
            )
        return images


def _hand_over(state: Denoising) -> None:
    """Switch a state whose base timesteps are done to its refiner stage (same latents)."""
    assert state.handoff is not None
    state.sampling, state.conditioning = state.handoff.sampling, state.handoff.conditioning
    state.stage, state.stage_start, state.handoff = "refiner", state.done, None
    state.controls = []  # ControlNets steer the base's UNet only


def _kept_steps(job: DenoiseJob) -> int:
    """Steps an init image's `strength` keeps (diffusers: `int(steps * strength)`)."""
    return min(int(job.steps * job.strength), job.steps)


def _all_finite(latents: list[torch.Tensor | None]) -> list[bool]:
    """Whether each tensor is finite (None: nothing to check), with one device-to-host copy."""
    checked = [torch.isfinite(t).all() for t in latents if t is not None]
    flags = iter(torch.stack(checked).tolist() if checked else [])
    return [True if t is None else bool(next(flags)) for t in latents]


def _nan_latents(state: Denoising) -> GenerationError:
    return GenerationError(
        f"request {state.job.id}'s latents became NaN or infinite at step {state.done + 1} "
        "(an fp16 overflow, broken weights or inputs); its image cannot be made",
        code="nan_output",
    )


def _raise_if_cancelled(job: DenoiseJob, cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise RequestCancelledError(f"request {job.id} was cancelled")


def _timings(job: DenoiseJob, denoise_ms: float, decode_ms: float) -> Timings:
    """Upstream timings (queue, encode) carried over; this engine's stages filled in."""
    upstream = {
        key: float(value)
        for key, value in job.timings.items()
        if key in Timings.model_fields and key not in ("denoise_ms", "decode_ms")
    }
    return Timings(**upstream, denoise_ms=denoise_ms, decode_ms=decode_ms)

"""The vocabularies of the contract, each defined once: preview kinds, image formats, sampler
names, ControlNet preprocessors and noise-mask patterns.
Schemas type their fields with these literals; everything else imports them from here.

Sampler names map to diffusers scheduler class names and options as plain strings, so the Router
can validate `scheduler` without importing diffusers; the engine builds the scheduler with
`from_config` of the checkpoint's own config.
"""

from typing import Any, Literal, get_args

PreviewKind = Literal["none", "latent", "tiny", "full"]
ImageFormat = Literal["png", "jpeg", "webp"]
SchedulerName = Literal[
    "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras", "unipc"
]

PREVIEW_KINDS: tuple[PreviewKind, ...] = get_args(PreviewKind)
IMAGE_FORMATS: tuple[ImageFormat, ...] = get_args(ImageFormat)
SCHEDULER_NAMES: tuple[SchedulerName, ...] = get_args(SchedulerName)

# ControlNet image preprocessors (`controlnet[].preprocessor`).
Preprocessor = Literal["none", "canny"]
PREPROCESSORS: tuple[Preprocessor, ...] = get_args(Preprocessor)

# Noise-injection mask patterns (`noise_mask.pattern`); shared.intake.noise_masks draws them.
NoiseMaskName = Literal[
    "circle",
    "square",
    "edges",
    "ring",
    "diamond",
    "radial",
    "gradient",
    "vertical_gradient",
    "checkerboard",
]
NOISE_MASK_NAMES: tuple[NoiseMaskName, ...] = get_args(NoiseMaskName)

SAMPLERS: dict[SchedulerName, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
if set(SAMPLERS) != set(SCHEDULER_NAMES):  # pragma: no cover - a mistake in this file
    raise RuntimeError("SAMPLERS must map exactly the SchedulerName literals")

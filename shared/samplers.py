"""Sampler names clients may ask for, mapped to diffusers scheduler classes and options.

Kept free of torch and diffusers imports so the Router can validate `scheduler` at the edge;
the engine turns a name into a scheduler with `from_config` of the checkpoint's own config.
"""

from __future__ import annotations

from typing import Any

SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
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
SCHEDULER_NAMES: tuple[str, ...] = tuple(SAMPLERS)

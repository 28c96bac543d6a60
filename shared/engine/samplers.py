"""Schedulers from sampler names: a fresh diffusers scheduler per request (they keep per-run
state, so requests never share one), built from the checkpoint's own scheduler config, and the
`step` arguments each one takes."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from shared.api.vocabulary import SAMPLERS, SCHEDULER_NAMES
from shared.errors import InvalidRequestError


def build_scheduler(name: str | None, config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler (they keep per-run state) for `name`; None is the checkpoint's own."""
    overrides: dict[str, Any]
    if name is None:
        class_name, overrides = str(config.get("_class_name", "EulerDiscreteScheduler")), {}
    elif name in SAMPLERS:
        class_name, overrides = SAMPLERS[name]
    else:
        raise InvalidRequestError(
            f"scheduler must be one of {', '.join(SCHEDULER_NAMES)}; got {name!r}",
            code="unknown_scheduler",
            param="scheduler",
        )
    scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config(config, **overrides)


def step_kwargs(scheduler: SchedulerMixin, generators: list[torch.Generator]) -> dict[str, Any]:
    """eta and generator where `step` takes them, exactly as diffusers' prepare_extra_step_kwargs:
    ancestral and SDE samplers draw their per-step noise from the per-image generators."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs

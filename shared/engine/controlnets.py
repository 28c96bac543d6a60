"""ControlNets inside a batched UNet call: each request's own ControlNets, scales and windows.

diffusers' `StableDiffusionXLControlNetPipeline` runs its ControlNet on every row of the batch
with one scale, and `MultiControlNetModel` sums several. Here one UNet call serves requests with
different ControlNets (or none), so each ControlNet runs only on the rows of the requests that
use it *at this step* — a request outside its `[start, end]` window, or at scale 0, adds
nothing, as diffusers' scale of 0 does, without the forward — and its residuals are multiplied
by each row's own scale and added into zeros for the whole batch. A row without ControlNets gets
zero residuals, which leave the UNet's sums unchanged, so it equals the same request run without
any.

The step window follows diffusers' `controlnet_keep`: step `i` of `n` is kept unless
`i / n < start` or `(i + 1) / n > end`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ControlNetModel

from shared.api.jobs import ControlInput, DenoiseJob
from shared.engine.previews import place_module
from shared.errors import InvalidRequestError

Residuals = tuple[list[torch.Tensor], torch.Tensor]


@dataclass
class Control:
    """One ControlNet of one request, ready to run: its control map repeated for the request's
    rows (negatives first with classifier-free guidance, as diffusers concatenates it)."""

    id: str
    image: torch.Tensor  # (rows, 3, H, W) float in [0, 1]
    scale: float
    start: float
    end: float

    def steers(self, index: int, total: int) -> bool:
        """Whether it adds anything at step `index` of `total`: a scale other than 0 and the
        step inside the window (diffusers' controlnet_keep)."""
        inside = not (index / total < self.start or (index + 1) / total > self.end)
        return inside and self.scale != 0


@dataclass
class ControlRows:
    """What the ControlNets see of one request in a UNet call: where its rows are, its
    ControlNets, and its step within its schedule."""

    offset: int
    controls: list[Control]
    index: int
    total: int


class ControlNets:
    """The ControlNets a model configures, on the engine's device and dtype, by id."""

    def __init__(
        self, models: dict[str, ControlNetModel], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.device, self.dtype = device, dtype
        self.models = {
            name: place_module(model, device, dtype) for name, model in sorted(models.items())
        }

    def check(self, job: DenoiseJob) -> None:
        """Every ControlNet the job names is configured and its map is at the job's size."""
        for index, control in enumerate(job.controlnets):
            if control.id not in self.models:
                raise InvalidRequestError(
                    f"model {job.model!r} has no ControlNet {control.id!r}; it has: "
                    f"{', '.join(self.models) or 'none'}",
                    code="unknown_controlnet",
                    param=f"controlnet.{index}.id",
                )
            shape = (job.height, job.width, 3)
            if control.image.shape != shape:
                raise InvalidRequestError(
                    f"controlnet.{index}.image must be {job.width}x{job.height} RGB at this "
                    f"point; got an array of shape {control.image.shape}",
                    param=f"controlnet.{index}.image",
                )

    def prepare(self, job: DenoiseJob, cfg: bool) -> list[Control]:
        count = len(job.seeds)
        return [self._control(control, count, cfg) for control in job.controlnets]

    def residuals(
        self,
        requests: list[ControlRows],
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added: dict[str, torch.Tensor],
    ) -> Residuals | None:
        """Summed residuals of every ControlNet for the whole batch, or None when no row uses
        one at this step (the UNet then runs without residual inputs at all)."""
        total: Residuals | None = None
        for name, model in self.models.items():
            rows, images, scales = [], [], []
            for request in requests:
                for control in request.controls:
                    if control.id == name and control.steers(request.index, request.total):
                        count = control.image.shape[0]
                        rows.append(torch.arange(request.offset, request.offset + count))
                        images.append(control.image)
                        scales.append(torch.full((count,), control.scale))
            if not rows:
                continue
            index = torch.cat(rows).to(self.device)
            down, mid = model(
                sample[index],
                timesteps[index],
                encoder_hidden_states=encoder_hidden_states[index],
                controlnet_cond=torch.cat(images),
                conditioning_scale=1.0,
                added_cond_kwargs={key: value[index] for key, value in added.items()},
                return_dict=False,
            )
            scale = torch.cat(scales).to(self.device, self.dtype).view(-1, 1, 1, 1)
            own = ([d * scale for d in down], mid * scale)
            total = _add(total, own, index, sample.shape[0])
        return total

    def _control(self, control: ControlInput, count: int, cfg: bool) -> Control:
        # diffusers' control image processor: float32 in [0, 1] (no normalisation), NCHW.
        pixels = np.asarray(control.image, dtype=np.float32) / 255.0
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        image = image.repeat_interleave(count, dim=0).to(self.device, self.dtype)
        if cfg:
            image = torch.cat([image] * 2)
        return Control(control.id, image, control.scale, control.start, control.end)


def _add(total: Residuals | None, own: Residuals, index: torch.Tensor, batch: int) -> Residuals:
    """`total` plus one ControlNet's residuals, placed at its rows of a `batch`-row call."""

    def placed(tensor: torch.Tensor) -> torch.Tensor:
        full = tensor.new_zeros((batch, *tensor.shape[1:]))
        return full.index_copy(0, index, tensor)

    down, mid = [placed(d) for d in own[0]], placed(own[1])
    if total is None:
        return down, mid
    return [a + b for a, b in zip(total[0], down, strict=True)], total[1] + mid

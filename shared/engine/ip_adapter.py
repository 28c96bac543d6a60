"""IP-Adapter in the UNet: installing an adapter, per-row scales and the rows of image embeddings.

`attach_ip_adapter` installs an adapter's state dict with diffusers' own loader
(`UNet2DConditionLoadersMixin._load_ip_adapter_weights`, what `IPAdapterMixin.load_ip_adapter`
calls), so a UNet call equals the diffusers pipeline's. After that the UNet takes
`added_cond_kwargs["image_embeds"] = [tensor (rows, 1, dim)]`: one CLIP image embedding per row,
zeros for the negative rows of classifier-free guidance (diffusers' convention for non-plus
adapters). `set_row_scales` gives each row its own adapter scale, so requests with different
`image_prompt_scale`, and requests without an image prompt (scale 0), share one UNet call.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import (
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

from shared.errors import ModelLoadError

IP_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
# The scale diffusers' loader gives every adapter (`set_ip_adapter_scale` changes it).
DEFAULT_SCALE = 1.0


def attach_ip_adapter(unet: UNet2DConditionModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Install a (non-plus) IP-Adapter from its flat state dict (`image_proj.*`,
    `ip_adapter.{id}.to_k_ip.weight`, ...) exactly as diffusers' `load_ip_adapter` does.

    Plus/full-face/FaceID adapters are refused: they condition on the vision encoder's hidden
    states or face embeddings, which `shared.engine.vision.ImageEncoder` does not produce.
    """
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in state_dict.items():
        group, _, name = key.partition(".")
        if group in nested:
            nested[group][name] = tensor
    if "proj.weight" not in nested["image_proj"] or "norm.weight" not in nested["image_proj"]:
        raise ModelLoadError(
            "only plain IP-Adapters (image_proj.proj + image_proj.norm, e.g. ip-adapter_sdxl) "
            f"are supported; this one has image_proj keys {sorted(nested['image_proj'])[:4]}",
            code="unsupported_model",
        )
    try:
        unet._load_ip_adapter_weights([nested])
    except KeyError as exc:
        raise ModelLoadError(
            f"the IP-Adapter does not fit this UNet: it has no weights {exc} for one of the "
            "UNet's cross-attention layers",
            code="weights_mismatch",
        ) from None
    except (RuntimeError, ValueError) as exc:  # shape mismatches, as diffusers words them
        raise ModelLoadError(
            f"the IP-Adapter does not fit this UNet: {exc}", code="weights_mismatch"
        ) from None


def has_ip_adapter(unet: UNet2DConditionModel) -> bool:
    return unet.config.encoder_hid_dim_type == "ip_image_proj" and isinstance(
        unet.encoder_hid_proj, MultiIPAdapterImageProjection
    )


def image_embeds_dim(unet: UNet2DConditionModel) -> int:
    """The size of the image embedding the attached adapter's projection takes."""
    if not has_ip_adapter(unet):
        raise ValueError("the UNet has no IP-Adapter attached")
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    if not isinstance(projection, ImageProjection):
        raise ValueError(f"unsupported IP-Adapter projection {type(projection).__name__}")
    return int(projection.image_embeds.in_features)


class RowScales:
    """Per-row adapter scales where diffusers' processor expects one float.

    IPAdapterAttnProcessor2_0 first asks `scale == 0` (to skip the adapter; with a plain tensor of
    several rows that `if` raises "Boolean value of Tensor ... is ambiguous") and then adds
    `scale * ip_hidden_states`, which this broadcasts over (rows, 1, 1). The product is taken in
    float32 and rounded to the states' dtype, which is what `python_float * half_tensor` does, so
    a row gets the same numbers in a mixed batch as alone with a float scale.
    """

    def __init__(self, scales: torch.Tensor) -> None:
        self.values = scales.float().reshape(-1, 1, 1)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int | float):
            return bool((self.values == other).all())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __mul__(self, states: torch.Tensor) -> torch.Tensor:
        return (self.values * states.float()).to(states.dtype)

    __rmul__ = __mul__


def set_row_scales(unet: UNet2DConditionModel, scales: torch.Tensor | None) -> None:
    """The adapter scale of each row of the next UNet calls (shape (rows,)); None restores
    diffusers' default, 1.0 for every row.

    When every row has the same scale it is set as a plain float, so diffusers' own code path
    runs unchanged (scale 0 skips the adapter entirely).
    """
    value: float | RowScales = DEFAULT_SCALE
    if scales is not None:
        flat = scales.detach().reshape(-1)
        same = bool((flat == flat[0]).all()) if flat.numel() else True
        value = float(flat[0]) if same and flat.numel() else RowScales(flat.to(unet.device))
    for processor in unet.attn_processors.values():
        if isinstance(processor, IP_PROCESSORS):
            processor.scale = [value] * len(processor.scale)


def image_prompt_rows(
    embedding: torch.Tensor | None,
    scale: float,
    images: int,
    cfg: bool,
    dim: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's rows of a UNet batch, in diffusers' order (negatives first under guidance):
    `image_embeds` (rows, 1, dim) and per-row `scales` (rows,).

    `embedding` is the request's (1, dim) or (dim,) image embedding, repeated for each of its
    `images`; its negative rows get zeros, as diffusers' `prepare_ip_adapter_image_embeds` does.
    A request without an image prompt (None) gets zeros and scale 0 on every row.
    """
    rows = images * (2 if cfg else 1)
    if embedding is None:
        zeros = torch.zeros(rows, 1, dim, device=device, dtype=dtype)
        return zeros, torch.zeros(rows, device=device)
    positive = embedding.reshape(1, 1, dim).to(device=device, dtype=dtype).repeat(images, 1, 1)
    embeds = torch.cat([torch.zeros_like(positive), positive]) if cfg else positive
    return embeds, torch.full((rows,), float(scale), device=device)

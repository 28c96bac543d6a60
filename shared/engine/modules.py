"""Torch modules, tokenizers, image processors and scheduler configs built back from
`ComponentWeights`.

Replicas call `build_module`, `build_state_dict`, `build_tokenizer`, `build_image_processor` and
`build_scheduler_config` on the components that ModelCache keeps in the object store. On CPU
with the stored dtype a module's parameters are views of the component's arrays, so weights are
not copied on CPU and replicas on one node share a single copy. torch, diffusers, transformers
and accelerate are imported inside the build functions, so importing this module stays light.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from shared.errors import ModelLoadError
from shared.weights.tensor_files import DTYPES

if TYPE_CHECKING:
    import torch
    import transformers

    from shared.weights.loader import ComponentWeights
    from shared.weights.tensor_files import TensorBlob


def pick_device(assigned_gpus: int) -> str:
    """`cuda` if this process was given a GPU and one is there, else `cpu`.

    Asking only `torch.cuda.is_available()` is not enough under Ray: a replica with `num_gpus: 0`
    on a GPU node still sees every GPU (Ray leaves CUDA_VISIBLE_DEVICES alone when it assigns
    none), and would quietly share one with the replicas that reserved it.
    """
    import torch

    return "cuda" if assigned_gpus > 0 and torch.cuda.is_available() else "cpu"


def build_module(
    weights: ComponentWeights, device: str = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Build the component's module with its weights, in eval mode and without gradients.

    On CPU with the stored dtype the parameters *are* the arrays in `weights` (no copy), so
    replicas on one node share a single copy of the weights from Ray's object store.
    """
    import torch
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            module = _instantiate(weights)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ModelLoadError(
            f"component {weights.name}: cannot build {weights.class_name} from its config: {exc}",
            code="unsupported_model",
        ) from None
    names = _module_keys(module, weights)
    state = {
        names[key]: _to_device(_tensor_view(blob), device, dtype)
        for key, blob in weights.tensors.items()
    }
    _assign(module, state, weights)
    if torch.device(device).type != "cpu" or dtype is not None:
        module.to(device=device, dtype=dtype)  # buffers made at construction; parameters are no-ops
    return module.eval().requires_grad_(False)


def build_state_dict(
    weights: ComponentWeights, device: str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The component's tensors by checkpoint key (an IP-Adapter's weights, which diffusers
    installs into a UNet itself); on CPU in the stored dtype they are views of its arrays."""
    return {
        key: _to_device(_tensor_view(blob), device, dtype) for key, blob in weights.tensors.items()
    }


def _instantiate(weights: ComponentWeights) -> torch.nn.Module:
    if weights.library == "diffusers":
        import diffusers

        cls = getattr(diffusers, weights.class_name, None)
        if cls is None:
            raise _unknown_class(weights)
        return cls.from_config(weights.config)
    if weights.library == "transformers":
        import transformers

        cls = getattr(transformers, weights.class_name, None)
        if cls is None:
            raise _unknown_class(weights)
        return cls._from_config(cls.config_class.from_dict(weights.config))
    raise _unknown_class(weights)


def _module_keys(module: torch.nn.Module, weights: ComponentWeights) -> dict[str, str]:
    """Checkpoint key -> module key. Identity for diffusers; transformers renames on load (v5's
    CLIPTextModel drops the `text_model.` prefix that SDXL's text_encoder checkpoints carry), so
    its own renaming rules are applied here too.
    """
    if weights.library != "transformers":
        return {key: key for key in weights.tensors}
    model = cast("transformers.PreTrainedModel", module)
    expected, prefix = model.state_dict(), model.base_model_prefix
    if all(key in expected for key in weights.tensors):
        # Nothing to rename (SDXL's CLIP checkpoints saved by a current transformers): skip
        # building transformers' conversion tables, a few hundred ms of regex compilation in
        # every fresh replica process.
        return {key: key for key in weights.tensors}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # transformers 4 renames nothing but the base model's prefix
        return {key: _swap_base_prefix(key, prefix, expected) for key in weights.tensors}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = {}
    for key in weights.tensors:
        # The same two tries as transformers' convert_and_load_state_dict_in_model.
        name, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:
            name, converter = rename_source_key(key, [], [], prefix, expected)
        if converter is not None and name in expected:
            raise ModelLoadError(
                f"component {weights.name}: tensor {key} needs transformers' weight conversion "
                f"({converter}), which copies; save the checkpoint with a current transformers",
                code="weights_mismatch",
            )
        names[key] = name
    return names


def _swap_base_prefix(key: str, prefix: str, expected: Mapping[str, Any]) -> str:
    if key.startswith(f"{prefix}.") and key.removeprefix(f"{prefix}.") in expected:
        return key.removeprefix(f"{prefix}.")
    return f"{prefix}.{key}" if f"{prefix}.{key}" in expected else key


def _unknown_class(weights: ComponentWeights) -> ModelLoadError:
    return ModelLoadError(
        f"component {weights.name}: unknown class {weights.library}.{weights.class_name}",
        code="unsupported_model",
    )


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[name][1])


def _tensor_view(blob: TensorBlob) -> torch.Tensor:
    """A CPU tensor over the blob's bytes: no copy, unless the bytes are misaligned for it."""
    import torch

    data = blob.data
    if data.ctypes.data % DTYPES[blob.dtype][0] or not data.flags.c_contiguous:
        data = np.ascontiguousarray(data).copy()  # fresh numpy buffers are aligned
    with warnings.catch_warnings():
        # Object-store arrays are read-only; modules built here only run inference.
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        flat = torch.from_numpy(data)
    return flat.view(_torch_dtype(blob.dtype)).reshape(blob.shape)


def _to_device(tensor: torch.Tensor, device: str, dtype: torch.dtype | None) -> torch.Tensor:
    cast = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
    # Move in the stored (usually smaller) dtype, then cast on the target device.
    tensor = tensor.to(device)
    return tensor.to(dtype) if cast else tensor


def _assign(
    module: torch.nn.Module, state: dict[str, torch.Tensor], weights: ComponentWeights
) -> None:
    """Load `state` by assignment (sharing storage), then insist every tensor is materialized."""
    expected = set(module.state_dict())
    ignorable = _non_persistent_buffers(module) | {
        key
        for key in state
        for pattern in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ()
        if re.search(pattern, key)
    }
    unexpected = sorted(set(state) - expected - ignorable)
    if unexpected:
        raise ModelLoadError(
            f"component {weights.name}: the checkpoint has {len(unexpected)} tensors that "
            f"{weights.class_name} does not, e.g. {', '.join(unexpected[:3])}; does the config "
            "match the weights?",
            code="weights_mismatch",
        )
    try:
        module.load_state_dict(
            {k: v for k, v in state.items() if k in expected}, strict=False, assign=True
        )
    except RuntimeError as exc:
        raise ModelLoadError(f"component {weights.name}: {exc}", code="weights_mismatch") from None
    on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise ModelLoadError(
            f"component {weights.name}: no weights for {len(on_meta)} tensors, e.g. "
            f"{', '.join(on_meta[:3])}",
            code="missing_weights",
        )


def _non_persistent_buffers(module: torch.nn.Module) -> set[str]:
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        for name in sub._non_persistent_buffers_set
    }


def build_tokenizer(weights: ComponentWeights) -> transformers.PreTrainedTokenizerBase:
    """Rebuild a tokenizer from its files (written to a scratch folder for `from_pretrained`)."""
    import transformers

    cls = getattr(transformers, weights.class_name, None) or transformers.AutoTokenizer
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as folder:
        for filename, data in weights.files.items():
            if Path(filename).name != filename:
                raise ModelLoadError(f"tokenizer file name {filename!r} is not a plain name")
            (Path(folder) / filename).write_bytes(data)
        try:
            return cls.from_pretrained(folder)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(
                f"component {weights.name}: cannot build {weights.class_name} from "
                f"{', '.join(sorted(weights.files))}: {exc}",
                code="unsupported_model",
            ) from None


def build_image_processor(weights: ComponentWeights) -> transformers.CLIPImageProcessor:
    """The CLIPImageProcessor of a vision encoder component: from its preprocessor_config.json
    if it has one, else the one diffusers' `load_ip_adapter` makes for encoders without one
    (h94/IP-Adapter's): CLIP defaults at the encoder's own `image_size`."""
    import transformers

    processor_file = weights.files.get("preprocessor_config.json")
    try:
        if processor_file is not None:
            return transformers.CLIPImageProcessor.from_dict(json.loads(processor_file))
        size = int(weights.config.get("image_size", 224))
        return transformers.CLIPImageProcessor(size=size, crop_size=size)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"component {weights.name}: cannot build its CLIPImageProcessor: {exc}",
            code="unsupported_model",
        ) from None


def build_scheduler_config(weights: ComponentWeights) -> dict[str, Any]:
    """The scheduler's config, with its class name, for `SchedulerClass.from_config`."""
    return {**json.loads(json.dumps(weights.config)), "_class_name": weights.class_name}

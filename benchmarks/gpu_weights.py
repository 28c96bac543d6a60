"""Weights to the GPU: how long until an SDXL-size UNet (2.6 B parameters, random fp16 weights,
5.1 GB) is on the device and ready, starting from

- the object-store arrays: the UNet's `ComponentWeights` in RAM, which is what `ray.get` of a
  ModelCache ref hands a new replica, built with `build_module(device="cuda")`;
- the checkpoint on local disk: diffusers' `UNet2DConditionModel.from_pretrained(...).to("cuda")`
  (the page cache is warm after the warm-up run, so this is its best case).

It needs no Ray (torch, diffusers, accelerate, safetensors, pydantic, fsspec), so it runs on a GPU
machine that has only the model stack. The "object-store arrays" here are the same numpy
containers in this process's heap, already touched by the warm-up, rather than a `ray.get` view
of shared memory in a fresh process: right for timing the copy to the device, which is the part
this compares, but a fresh replica also pays its first page faults on the shared pages.

    python benchmarks/gpu_weights.py            # SDXL-size UNet, on cuda
    python benchmarks/gpu_weights.py --smoke    # a small UNet on whatever device is there, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from benchmarks.common import measure, print_table, save, summarize

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, the parts that shape the weights.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SMOKE_UNET = {
    **SDXL_UNET,
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 1],
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 8,
}


def write_checkpoint(folder: Path, config: dict[str, Any]) -> int:
    """A diffusers-layout model holding only a UNet with random fp16 weights; returns its bytes.

    The module is made on the meta device and each tensor drawn directly in fp16, so an SDXL-size
    UNet takes seconds and 5 GB rather than a float32 initialisation twice that size.
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    generator = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(t.shape, generator=generator) * 0.02).to(torch.float16)
        for name, t in unet.state_dict().items()
    }
    (folder / "unet").mkdir(parents=True)
    unet.save_config(folder / "unet")
    save_file(state, folder / "unet" / "diffusion_pytorch_model.safetensors")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return sum(t.numel() * t.element_size() for t in state.values())


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def from_arrays(folder: Path, device: str) -> Callable[[], None]:
    import torch

    from shared.config import ModelConfig
    from shared.engine.modules import build_module
    from shared.weights.loader import load_model

    config = ModelConfig(id="bench", source=str(folder), preview_decoder=None)
    weights = load_model(config, components=("unet",)).components["unet"]

    def run() -> None:
        module = build_module(weights, device=device, dtype=torch.float16)
        synchronize(device)
        del module
        release(device)

    return run


def from_disk(folder: Path, device: str) -> Callable[[], None]:
    import torch
    from diffusers import UNet2DConditionModel

    def run() -> None:
        module = UNet2DConditionModel.from_pretrained(
            folder / "unet", torch_dtype=torch.float16
        ).to(device)
        synchronize(device)
        del module
        release(device)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--smoke", action="store_true", help="small UNet, 2 runs, for CI")
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    unet_config = SMOKE_UNET if args.smoke else SDXL_UNET
    runs, warmup = (2, 1) if args.smoke else (args.runs, args.warmup)
    with tempfile.TemporaryDirectory(prefix="gpu-weights-") as scratch:
        folder = Path(scratch)
        nbytes = write_checkpoint(folder, unet_config)
        rows = {
            "object-store arrays": summarize(measure(from_arrays(folder, device), runs, warmup)),
            "from_pretrained (disk)": summarize(measure(from_disk(folder, device), runs, warmup)),
        }

    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    title = f"UNet weights to {device} ({device_name}), fp16, {nbytes / 1e9:.2f} GB"
    print_table(title, rows, baseline="object-store arrays")
    name = "gpu_weights_smoke" if args.smoke else "gpu_weights"
    config = {"device": device_name, "unet_bytes": nbytes, "runs": runs, "warmup": warmup}
    path = save(name, config, rows, "object-store arrays", ylabel="time to weights on device (ms)")
    print(f"saved {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

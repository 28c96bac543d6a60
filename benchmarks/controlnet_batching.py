"""ControlNet requests in a shared UNet call: one step of four requests, two of them with a
ControlNet, three ways, without Ray.

- `ours`: one UNet call for all four; the ControlNet runs on the rows of the two that use it.
- `controlnet on every row`: one UNet call, with the ControlNet run on all rows (what a batch
  gets when it treats the ControlNet as part of the model, as diffusers' pipeline does, the two
  plain requests at a negligible scale).
- `batching off`: one UNet call per request (the baseline).

Reports milliseconds per step of the four requests.

    python benchmarks/controlnet_batching.py           # the built-in `small` model, CPU
    python benchmarks/controlnet_batching.py --smoke   # `tiny`, for CI
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from benchmarks.common import denoise_job, measure, print_table, save, summarize

CONTROLLED_SCALE = 1.0
NEGLIGIBLE_SCALE = 1e-6


def build(smoke: bool) -> Any:
    """The preset's engine with a ControlNet made from its UNet (the built-in one for `tiny`)."""
    import torch
    from diffusers import ControlNetModel

    from shared.engine.controlnets import ControlNets
    from shared.engine.sdxl import SDXLEngine
    from shared.weights.builtin import resolve_builtin

    preset = "tiny" if smoke else "small"
    engine = SDXLEngine.from_pretrained_dir(resolve_builtin(preset))
    if smoke:
        controlnet = ControlNetModel.from_pretrained(resolve_builtin("tiny-controlnet"))
    else:
        torch.manual_seed(0)
        controlnet = ControlNetModel.from_unet(
            engine.unet, conditioning_embedding_out_channels=(16, 32, 96, 256)
        )
    engine.controlnets = ControlNets({"edges": controlnet}, engine.device, engine.dtype)
    return engine


def jobs(engine: Any, side: int, steps: int) -> list[Any]:
    import numpy as np

    from shared.api.jobs import ControlInput, PromptEmbeddings

    config = engine.unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    rng = np.random.default_rng(0)
    text = rng.standard_normal((1, 77, config.cross_attention_dim)).astype(np.float32)
    vector = rng.standard_normal((1, pooled)).astype(np.float32)
    embeddings = PromptEmbeddings(text, vector, text * 0, vector * 0)
    edges = np.zeros((side, side, 3), dtype=np.uint8)
    edges[:, :: side // 8] = 255
    base = replace(denoise_job(embeddings, steps), width=side, height=side)
    control = ControlInput("edges", edges, scale=CONTROLLED_SCALE)
    return [
        replace(base, id=str(i), seeds=[i], controlnets=[control] if i % 2 else [])
        for i in range(4)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few runs (CI)")
    parser.add_argument("--side", type=int, default=None, help="image side in pixels")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    side = args.side or (64 if args.smoke else 128)
    runs = args.runs or (3 if args.smoke else 5)
    engine = build(args.smoke)
    ours = jobs(engine, side, steps=runs + 2)
    negligible = [replace(ours[1].controlnets[0], scale=NEGLIGIBLE_SCALE)]
    everyone = [replace(j, controlnets=j.controlnets or negligible) for j in ours]

    def stepper(group: list[Any], together: bool) -> Any:
        states = [engine.prepare(job) for job in group]

        def step() -> None:
            if together:
                engine.step(states)
            else:
                for state in states:
                    engine.step([state])

        return step

    rows = {
        "ours": summarize(measure(stepper(ours, True), runs=runs, warmup=1)),
        "controlnet on every row": summarize(measure(stepper(everyone, True), runs, 1)),
        "batching off": summarize(measure(stepper(ours, False), runs=runs, warmup=1)),
    }
    title = f"one step of 4 requests (2 with a ControlNet), {side}x{side}, CFG, ms"
    print_table(title, rows, baseline="batching off")
    config = {"smoke": args.smoke, "side": side, "runs": runs, "requests": 4, "controlled": 2}
    name = "controlnet_batching_smoke" if args.smoke else "controlnet_batching"
    print(save(name, config, rows, baseline="batching off", ylabel="ms per step of 4 requests"))


if __name__ == "__main__":
    main()

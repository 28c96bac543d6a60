"""A model's suite with its ControlNets and refiner: read with the model, rebuilt into the same
modules diffusers loads, their digests recorded, and a missing one failing the load by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from shared.config import ControlNetConfig, ModelConfig, RefinerConfig
from shared.engine.modules import build_module, build_scheduler_config
from shared.errors import ModelLoadError
from shared.weights.builtin import resolve_builtin
from shared.weights.loader import load_suite


def _config(**fields: object) -> ModelConfig:
    return ModelConfig(id="tiny", source="tiny", preview_decoder=None, **fields)  # type: ignore[arg-type]


def _same_module(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    mine, expected = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == expected.keys()
    assert all(torch.equal(mine[key], expected[key]) for key in expected)


def test_controlnets_and_the_refiner_load_with_the_model(tmp_path: Path) -> None:
    local = tmp_path / "my-controlnet"
    shutil.copytree(resolve_builtin("tiny-controlnet"), local)
    weights = load_suite(
        _config(
            controlnets=[
                ControlNetConfig(id="canny", source="tiny-controlnet"),
                ControlNetConfig(id="local", source=str(local)),
            ],
            refiner=RefinerConfig(id="refiner", source="tiny-refiner"),
        )
    )
    expected = ControlNetModel.from_pretrained(resolve_builtin("tiny-controlnet"))
    for name in ("controlnet:canny", "controlnet:local"):
        _same_module(build_module(weights.components[name]), expected)
        assert f"{name}/diffusion_pytorch_model.safetensors" in weights.digests[name]
    refiner = resolve_builtin("tiny-refiner")
    _same_module(
        build_module(weights.components["refiner_unet"]),
        UNet2DConditionModel.from_pretrained(refiner / "unet"),
    )
    scheduler = build_scheduler_config(weights.components["refiner_scheduler"])
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    index = weights.components["refiner"].config
    assert index["requires_aesthetics_score"] is True
    assert index["force_zeros_for_empty_prompt"] is False
    assert "refiner/unet/diffusion_pytorch_model.safetensors" in weights.digests["refiner_unet"]


def test_a_missing_controlnet_or_refiner_fails_the_load_by_name(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError) as controlnet:
        load_suite(_config(controlnets=[ControlNetConfig(id="edges", source=missing)]))
    assert "controlnet:edges" in controlnet.value.message
    with pytest.raises(ModelLoadError) as refiner:
        load_suite(_config(refiner=RefinerConfig(id="ref", source=missing)))
    assert "refiner 'ref'" in refiner.value.message


def test_a_pickled_controlnet_is_refused_unless_allowed(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    ControlNetModel.from_pretrained(resolve_builtin("tiny-controlnet")).save_pretrained(
        pickled, safe_serialization=False
    )
    nets = [ControlNetConfig(id="old", source=str(pickled))]
    with pytest.raises(ModelLoadError) as refused:
        load_suite(_config(controlnets=nets))
    assert "allow_pickle" in refused.value.message
    weights = load_suite(_config(controlnets=nets, allow_pickle=True))
    assert "controlnet:old" in weights.components

"""ControlNets as `controlnet:<id>` components (shared/weights/loader.py) and the built-in
`tiny-controlnet`.

The built-in is checked against plain diffusers: it loads with `ControlNetModel.from_pretrained`,
builds the same bytes every time and steers tiny's UNet, by an amount that depends on the control
map. The loader against `from_pretrained` of the same folder: tensors, and the built module's
outputs. Sources: the built-in, a local folder, a subfolder of the model's source. Refusals: a
missing folder, pickle weights unless `allow_pickle`, a checksum mismatch; each names the
ControlNet.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file

from shared.config import ModelConfig
from shared.engine.modules import build_module, build_state_dict
from shared.errors import ModelLoadError
from shared.weights.builtin import resolve_builtin
from shared.weights.loader import ENGINE_COMPONENTS, load_suite

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _config(controlnet: str, /, **model: Any) -> ModelConfig:
    """Model `m` (`tiny` unless `model` says otherwise), ControlNet `edges` from `controlnet`."""
    controlnets = [{"id": "edges", "source": controlnet}]
    return ModelConfig(**{"id": "m", "source": "tiny", "controlnets": controlnets, **model})


def _errors(config: ModelConfig) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_suite(config)
    return info.value


def _edges(seed: int) -> torch.Tensor:
    """A Canny-like control map for a 128x128 image (tiny's 16x16 latents): white lines on black."""
    y, x = np.mgrid[0:128, 0:128]
    lines = (x % 16 == seed) | (y == 8 * seed) | (np.abs(x - y - seed) < 1)
    return torch.from_numpy(lines.astype(np.float32))[None, None].repeat(1, 3, 1, 1)


def _inputs() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "sample": noise(1, 4, 16, 16),
        "timestep": 10,
        "encoder_hidden_states": noise(1, 8, 64),
        "added_cond_kwargs": {"text_embeds": noise(1, 32), "time_ids": noise(1, 6)},
    }


def _residuals(controlnet: torch.nn.Module, cond: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        down, mid = controlnet(**_inputs(), controlnet_cond=cond, return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


@pytest.fixture(scope="module")
def builtin() -> Path:
    return resolve_builtin("tiny-controlnet")


@pytest.fixture(scope="module")
def reference(builtin: Path) -> ControlNetModel:
    return ControlNetModel.from_pretrained(builtin).eval()


@pytest.fixture(scope="module")
def loaded(builtin: Path) -> Any:
    return load_suite(_config("tiny-controlnet")).components["controlnet:edges"]


# --------------------------------------------------------------------------- built-in ControlNet


def test_builtin_is_a_diffusers_controlnet_folder_built_the_same_every_time(
    builtin: Path, tmp_path: Path
) -> None:
    assert {"config.json", WEIGHTS} <= {p.name for p in builtin.iterdir()}
    again = resolve_builtin("tiny-controlnet", root=tmp_path)
    assert (again / WEIGHTS).read_bytes() == (builtin / WEIGHTS).read_bytes()
    assert (again / "config.json").read_bytes() == (builtin / "config.json").read_bytes()


def test_builtin_steers_tinys_unet_by_its_control_map(
    reference: ControlNetModel, tiny_model_dir: Path
) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    with torch.no_grad():
        plain = unet(**_inputs()).sample
        one, other = (unet(**_inputs(), **_residuals(reference, _edges(s))).sample for s in (3, 5))

    def moved(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / plain.norm())

    assert moved(one, plain) > 0.3
    assert moved(one, other) > 0.1  # the map matters, not only that a ControlNet runs


# ------------------------------------------------------------------------------------- loading


def test_load_suite_reads_the_builtin_like_from_pretrained(
    loaded: Any, reference: ControlNetModel
) -> None:
    assert (loaded.library, loaded.class_name) == ("diffusers", "ControlNetModel")
    state = reference.state_dict()
    ours = build_state_dict(loaded)
    assert ours.keys() == state.keys()
    assert all(torch.equal(ours[key], state[key]) for key in state)
    assert set(loaded.files_sha256) == {
        "controlnet:edges/config.json",
        f"controlnet:edges/{WEIGHTS}",
    }
    assert "controlnet:edges" not in ENGINE_COMPONENTS  # SDXLPipeline fetches it by name


def test_built_module_matches_from_pretrained(loaded: Any, reference: ControlNetModel) -> None:
    module = build_module(loaded)
    assert isinstance(module, ControlNetModel)
    ours, theirs = _residuals(module, _edges(3)), _residuals(reference, _edges(3))
    down = "down_block_additional_residuals"
    assert all(torch.equal(a, b) for a, b in zip(ours[down], theirs[down], strict=True))
    assert torch.equal(
        ours["mid_block_additional_residual"], theirs["mid_block_additional_residual"]
    )


def test_local_folder_and_subfolder_of_the_model(
    builtin: Path, tiny_model_dir: Path, loaded: Any, tmp_path: Path
) -> None:
    folder = shutil.copytree(builtin, tmp_path / "canny")
    local = load_suite(_config(str(folder))).components["controlnet:edges"]
    assert local.files_sha256 == loaded.files_sha256

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    shutil.copytree(builtin, model / "controlnet_canny")
    inside = load_suite(_config("controlnet_canny", source=str(model)))
    component = inside.components["controlnet:edges"]
    assert set(component.files_sha256) == {
        "controlnet_canny/config.json",
        f"controlnet_canny/{WEIGHTS}",
    }
    assert (
        component.files_sha256[f"controlnet_canny/{WEIGHTS}"]
        == (loaded.files_sha256[f"controlnet:edges/{WEIGHTS}"])
    )


def test_a_missing_controlnet_fails_the_load_naming_it(tmp_path: Path) -> None:
    error = _errors(_config(str(tmp_path / "no-such-controlnet")))
    assert error.code == "model_not_found"
    assert "edges" in error.message and "no-such-controlnet" in error.message

    (tmp_path / "empty").mkdir()
    error = _errors(_config(str(tmp_path / "empty")))
    assert error.code == "missing_file" and "edges" in error.message


def test_pickle_controlnet_refused_unless_allowed(
    builtin: Path, reference: ControlNetModel, tmp_path: Path
) -> None:
    folder = tmp_path / "pickled"
    reference.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()

    error = _errors(_config(str(folder)))
    assert error.code == "pickle_refused" and "edges" in error.message

    weights = load_suite(_config(str(folder), allow_pickle=True)).components["controlnet:edges"]
    state = load_file(builtin / WEIGHTS)
    ours = build_state_dict(weights)
    assert all(torch.equal(ours[key], state[key]) for key in state)


def test_checksums_are_under_the_controlnet_prefix(loaded: Any) -> None:
    pinned = dict(loaded.files_sha256)
    assert (
        load_suite(_config("tiny-controlnet", sha256=pinned))
        .components["controlnet:edges"]
        .files_sha256
        == pinned
    )

    wrong = {f"controlnet:edges/{WEIGHTS}": "0" * 64}
    error = _errors(_config("tiny-controlnet", sha256=wrong))
    assert error.code == "checksum_mismatch" and "edges" in error.message

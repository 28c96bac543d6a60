"""LoRAs as `lora:<id>` components (shared/weights/loras.py) and the built-in tiny LoRAs.

The built-in LoRAs are checked against plain diffusers (`load_lora_weights` changes tiny's UNet
output); the loader against the files themselves: keys and bytes as in the file, the format
detected, the file's digest. Sources: local file, folder, S3 (moto on loopback, whose request log
shows what was fetched) and a Hub cache offline. Refusals: pickle files whatever `allow_pickle`
says, text-encoder LoRAs, keys in no supported format, missing files, checksums.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shared.config import ModelConfig
from shared.engine.modules import build_state_dict
from shared.errors import ModelLoadError
from shared.weights.builtin import TINY_LORA_KOHYA_WEIGHTS, TINY_LORA_WEIGHTS, resolve_builtin
from shared.weights.loader import load_suite
from shared.weights.loras import load_loras, lora_hub_patterns
from tests.unit.test_weights_loader import _hub_cache

if TYPE_CHECKING:
    from tests.s3_server import S3Server

BUILTINS = {"tiny-lora": TINY_LORA_WEIGHTS, "tiny-lora-kohya": TINY_LORA_KOHYA_WEIGHTS}
# Which of tiny's UNet modules each built-in LoRA adapts.
COVERAGE = {
    "tiny-lora": tuple(
        f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")
    ),
    "tiny-lora-kohya": ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
}
UNET_KEY = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"


def _config(*loras: dict[str, Any], **kwargs: Any) -> ModelConfig:
    return ModelConfig(**{"id": "m", "source": "tiny", "loras": list(loras), **kwargs})


def _load(lora_source: str, weight_name: str | None = None, /, **model: Any) -> Any:
    """LoRA `x` from `lora_source`, for a model configured with `model` (source, options...)."""
    lora = {"id": "x", "source": lora_source, "weight_name": weight_name}
    return load_loras(_config(lora, **model))["lora:x"]


def _errors(call: Any) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        call()
    return info.value


def _unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    extra = {"text_embeds": noise(1, 32), "time_ids": noise(1, 6)}
    with torch.no_grad():
        return unet(noise(1, 4, 16, 16), 10, noise(1, 8, 64), added_cond_kwargs=extra).sample


def _lora_file(path: Path, keys: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.ones(4, 4) for key in keys}, path)
    return path


# ----------------------------------------------------------------------------- built-in LoRAs


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loras_load_in_plain_diffusers_and_change_the_unet(
    name: str, tiny_model_dir: Path
) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    before = _unet_output(pipe.unet)
    expected = {
        n
        for n, m in pipe.unet.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(COVERAGE[name])
    }
    folder = resolve_builtin(name)
    assert folder.name == f"{name}-v1"
    pipe.load_lora_weights(str(folder), weight_name=BUILTINS[name], adapter_name="a")
    after = _unet_output(pipe.unet)
    assert (after - before).norm() / before.norm() > 0.1, "the LoRA must visibly change outputs"
    modules = [n for n, _ in pipe.unet.named_modules()]
    adapted = {n.removesuffix(".lora_A") for n in modules if n.endswith(".lora_A")}
    assert adapted == expected and len(expected) >= 24
    pipe.disable_lora()
    assert torch.equal(_unet_output(pipe.unet), before)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loras_are_deterministic(name: str, tmp_path: Path) -> None:
    cached = resolve_builtin(name) / BUILTINS[name]
    rebuilt = resolve_builtin(name, root=tmp_path) / BUILTINS[name]
    assert rebuilt.read_bytes() == cached.read_bytes()
    assert sorted(p.name for p in rebuilt.parent.glob("*.safetensors")) == [BUILTINS[name]]


# --------------------------------------------------------------------------------- components


def test_lora_components_hold_the_file_exactly() -> None:
    loras = [{"id": "style", "source": "tiny-lora"}, {"id": "k", "source": "tiny-lora-kohya"}]
    weights = load_suite(_config(*loras))
    assert {"lora:style", "lora:k"} <= weights.components.keys()
    cases = [("style", "tiny-lora", "diffusers"), ("k", "tiny-lora-kohya", "kohya")]
    for lora_id, name, lora_format in cases:
        component = weights.components[f"lora:{lora_id}"]
        path = resolve_builtin(name) / BUILTINS[name]
        assert (component.name, component.library, component.class_name) == (
            f"lora:{lora_id}",
            "peft",
            "LoRA",
        )
        with safe_open(str(path), "pt") as file:
            keys, metadata = list(file.keys()), file.metadata()
        assert sorted(component.tensors) == sorted(keys)
        assert component.config == {
            "source": name,
            "weight_name": BUILTINS[name],
            "format": lora_format,
            "metadata": metadata,
        }
        expected = load_file(path)
        built = build_state_dict(component)
        assert all(torch.equal(built[key], tensor) for key, tensor in expected.items())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert component.files_sha256 == {f"lora:{lora_id}/{BUILTINS[name]}": digest}
        assert weights.digests[f"lora:{lora_id}"] == component.files_sha256
        copy = pickle.loads(pickle.dumps(component, protocol=5))
        assert copy.config == component.config and copy.tensors.keys() == component.tensors.keys()
    assert weights.components["lora:k"].config["metadata"] == {"ss_network_module": "networks.lora"}
    assert not any(name.startswith("lora:") for name in load_suite(_config()).components)


def test_local_file_folder_and_weight_name_sources(tmp_path: Path) -> None:
    builtin = resolve_builtin("tiny-lora") / TINY_LORA_WEIGHTS
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(builtin, folder / "style.safetensors")
    reference = _load("tiny-lora")

    by_file = _load(str(folder / "style.safetensors"))
    assert by_file.config["weight_name"] == "style.safetensors"
    assert list(by_file.files_sha256) == ["lora:x/style.safetensors"]
    lone = _load(str(folder))
    assert lone.files_sha256 == by_file.files_sha256
    for component in (by_file, lone):
        assert all(
            np.array_equal(component.tensors[k].data, b.data) for k, b in reference.tensors.items()
        )

    shutil.copy(
        resolve_builtin("tiny-lora-kohya") / TINY_LORA_KOHYA_WEIGHTS, folder / "k.safetensors"
    )
    error = _errors(lambda: _load(str(folder)))
    assert error.code == "lora_ambiguous" and "k.safetensors, style.safetensors" in error.message
    assert _load(str(folder), "k.safetensors").config["format"] == "kohya"
    conflict = _errors(lambda: _load(str(folder / "k.safetensors"), "style.safetensors"))
    assert conflict.code == "invalid_lora_source"


def test_missing_lora_files_fail_the_model_naming_them(tmp_path: Path) -> None:
    gone = {"id": "gone", "source": str(tmp_path / "a.safetensors")}
    error = _errors(lambda: load_suite(_config(gone)))
    assert error.code == "missing_file"
    assert "'gone'" in error.message and str(tmp_path / "a.safetensors") in error.message
    error = _errors(lambda: _load("tiny-lora", "nope.safetensors"))
    assert error.code == "missing_file" and "nope.safetensors" in error.message
    error = _errors(lambda: _load(str(tmp_path)))
    assert error.code == "missing_file" and "no .safetensors" in error.message
    error = _errors(lambda: _load(str(tmp_path / "nowhere")))
    assert error.code == "model_not_found" and "nowhere" in error.message


def test_lora_checksums_are_under_the_component_name() -> None:
    path = resolve_builtin("tiny-lora") / TINY_LORA_WEIGHTS
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    key = f"lora:x/{TINY_LORA_WEIGHTS}"
    assert _load("tiny-lora", sha256={key: digest}).files_sha256 == {key: digest}
    error = _errors(lambda: _load("tiny-lora", sha256={key: "0" * 64}))
    assert error.code == "checksum_mismatch" and digest in error.message
    typo = {"lora:x/other.safetensors": digest}
    assert _errors(lambda: _load("tiny-lora", sha256=typo)).code == "checksum_unverified"


def test_s3_file_and_folder_sources_read_only_the_lora(
    s3_server: S3Server, s3_tiny_url: str
) -> None:
    url = "s3://models/loras/style"
    s3_server.upload_folder(resolve_builtin("tiny-lora"), url)
    options = {"source": s3_tiny_url, "storage_options": s3_server.storage_options()}
    reference = _load("tiny-lora")
    s3_server.clear_log()
    sources = [(url, None), (f"{url}/{TINY_LORA_WEIGHTS}", None), (url, TINY_LORA_WEIGHTS)]
    for source, weight_name in sources:
        component = _load(source, weight_name, **options)
        assert component.files_sha256 == reference.files_sha256
    assert s3_server.object_gets(url) == [f"/models/loras/style/{TINY_LORA_WEIGHTS}"] * 3


def test_hub_source_downloads_only_the_named_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    from huggingface_hub.utils import filter_repo_objects

    repo_files = ["README.md", "style.safetensors", "other.safetensors", "style.bin"]
    fetched = filter_repo_objects(repo_files, allow_patterns=lora_hub_patterns("style.safetensors"))
    assert list(fetched) == ["style.safetensors"]

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(resolve_builtin("tiny-lora") / TINY_LORA_WEIGHTS, repo / "style.safetensors")
    _hub_cache(repo, tmp_path / "hub", "some-org/tiny-lora")
    # The model's storage_options apply to a LoRA source of the same kind (a Hub id or path).
    hub = {"source": str(tiny_model_dir), "storage_options": {"cache_dir": str(tmp_path / "hub")}}
    component = _load("some-org/tiny-lora", "style.safetensors", **hub)
    assert component.config["format"] == "diffusers"
    assert _load("some-org/tiny-lora", **hub).files_sha256 == component.files_sha256


# ----------------------------------------------------------------------------------- refusals


def test_pickle_loras_are_refused_even_with_allow_pickle(tmp_path: Path) -> None:
    state = load_file(resolve_builtin("tiny-lora") / TINY_LORA_WEIGHTS)
    torch.save(state, tmp_path / "style.bin")
    sources = [(str(tmp_path / "style.bin"), None), (str(tmp_path), "style.bin")]
    for source, weight_name in [*sources, (str(tmp_path), None)]:
        error = _errors(lambda s=source, w=weight_name: _load(s, w, allow_pickle=True))
        assert error.code == "lora_not_safetensors", (source, weight_name)
        assert "arbitrary code" in error.message and "style.bin" in error.message
    error = _errors(lambda: _load("s3://bucket/style.ckpt"))  # refused before any request
    assert error.code == "lora_not_safetensors"


@pytest.mark.parametrize(
    "keys",
    [
        [UNET_KEY, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"],
        ["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"],
        [
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        ],
        ["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"],
    ],
    ids=["diffusers-te", "diffusers-te2", "kohya-te1", "kohya-te2"],
)
def test_text_encoder_loras_are_refused(keys: list[str], tmp_path: Path) -> None:
    path = _lora_file(tmp_path / "te.safetensors", keys)
    config = _config({"id": "with-te", "source": str(path)})
    error = _errors(lambda: load_suite(config))
    assert error.code == "lora_text_encoder_unsupported"
    assert "'with-te'" in error.message and "text encoders" in error.message


@pytest.mark.parametrize(
    "keys",
    [
        ["unet.conv_in.weight"],  # a UNet checkpoint, not a LoRA
        ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"],  # no prefix
        ["lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"],  # LyCORIS LoHa
        [UNET_KEY, "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"],  # mixed
        [],
    ],
    ids=["checkpoint", "unprefixed", "lycoris", "mixed", "empty"],
)
def test_keys_in_no_supported_format_are_refused(keys: list[str], tmp_path: Path) -> None:
    path = _lora_file(tmp_path / "odd.safetensors", keys)
    error = _errors(lambda: _load(str(path)))
    assert error.code == "lora_unrecognised" and "'x'" in error.message
    assert "lora_unet_" in error.message and "lora_A" in error.message

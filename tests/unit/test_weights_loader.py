"""Model loading (shared/ weights, sources, tensor_files, modules): sources, safetensors
parsing, integrity checks, each file's digest, VAE overrides and zero-copy module builds.

No Ray: pickling a component stands in for the object store. S3 runs against a real S3-protocol
server on loopback (moto), whose request log shows how many times each object was fetched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load_file, save_file

from shared.config import ModelConfig
from shared.engine.modules import build_module, build_scheduler_config, build_tokenizer, pick_device
from shared.errors import ModelLoadError
from shared.weights.builtin import IP_ADAPTER_IMAGE_ENCODER, IP_ADAPTER_WEIGHTS, resolve_builtin
from shared.weights.loader import (
    SDXL_COMPONENTS,
    ComponentWeights,
    ip_adapter_hub_patterns,
    load_component,
    load_ip_adapter,
    load_model,
    load_suite,
)
from shared.weights.sources import open_source
from shared.weights.tensor_files import TensorBlob, parse_safetensors

if TYPE_CHECKING:
    from tests.s3_server import S3Server

pytest_plugins = ["tests.s3_server"]  # fixtures s3_server, s3_tiny_url

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2", "taesd")
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


def _config(**kwargs: Any) -> ModelConfig:
    return ModelConfig(**{"id": "m", "source": "tiny", **kwargs})


@pytest.fixture(scope="module")
def tiny_weights(tiny_model_dir: Path) -> Any:
    return load_model(_config(), extra={"taesd": "taesd"})


def _copy_component(tiny_model_dir: Path, tmp_path: Path, name: str) -> Path:
    shutil.copytree(tiny_model_dir / name, tmp_path / name)
    return tmp_path / name


def _load(root: Path, name: str, **config: Any) -> ComponentWeights:
    return load_component(LocalFileSystem(), str(root), name, _config(**config))


def _reference(folder: Path, weights: ComponentWeights) -> torch.nn.Module:
    """The same component loaded the usual way, by diffusers or transformers."""
    import diffusers
    import transformers

    library = diffusers if weights.library == "diffusers" else transformers
    return getattr(library, weights.class_name).from_pretrained(folder).eval()


def _forward(name: str, module: Any) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    with torch.no_grad():
        if name == "unet":
            extra = {"text_embeds": noise(1, 32), "time_ids": noise(1, 6)}
            out = module(noise(1, 4, 16, 16), 10, noise(1, 8, 64), added_cond_kwargs=extra)
            return [out.sample]
        if name in ("vae", "taesd"):
            return [module.decode(noise(1, 4, 8, 8)).sample]
        out = module(torch.tensor([[977, 353, 532, 530, 978]]))
        return [out[0], out[1]]


def _errors(call: Any) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        call()
    return info.value


# --------------------------------------------------------------------------- round trip, local


def test_tiny_loads_every_component_as_plain_data(tiny_weights: Any) -> None:
    assert set(tiny_weights.components) == {*SDXL_COMPONENTS, "taesd"}
    unet = tiny_weights.components["unet"]
    assert (unet.library, unet.class_name) == ("diffusers", "UNet2DConditionModel")
    assert tiny_weights.components["text_encoder_2"].class_name == "CLIPTextModelWithProjection"
    assert tiny_weights.components["taesd"].class_name == "AutoencoderTiny"
    tokenizer = tiny_weights.components["tokenizer"]
    assert not tokenizer.tensors and "tokenizer.json" in tokenizer.files
    assert all(b.data.dtype == np.uint8 and b.data.ndim == 1 for b in unet.tensors.values())
    assert tiny_weights.nbytes == sum(c.nbytes for c in tiny_weights.components.values()) > 6e6
    copy = pickle.loads(pickle.dumps(unet, protocol=5))
    assert copy.tensors.keys() == unet.tensors.keys()


@pytest.mark.parametrize("name", MODULES)
def test_built_module_matches_from_pretrained(
    name: str, tiny_weights: Any, tiny_model_dir: Path
) -> None:
    weights = tiny_weights.components[name]
    module = build_module(weights)
    reference = _reference(tiny_model_dir / name, weights)
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    for ours, theirs in zip(_forward(name, module), _forward(name, reference), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ["unet", "text_encoder"])
def test_cpu_build_shares_memory_with_the_arrays(name: str, tiny_weights: Any) -> None:
    # A pickle round trip stands in for ray.put/ray.get: the arrays are then not the file's bytes.
    weights = pickle.loads(pickle.dumps(tiny_weights.components[name], protocol=5))
    module = build_module(weights)
    state = module.state_dict()
    for key, blob in weights.tensors.items():
        start = blob.data.ctypes.data
        assert state[key].data_ptr() == start, key
        assert state[key].untyped_storage().nbytes() <= blob.data.nbytes
    # Non-persistent buffers (CLIP's position_ids) are real tensors, not meta.
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def test_same_dtype_on_cpu_is_still_zero_copy(tiny_weights: Any) -> None:
    weights = tiny_weights.components["vae"]  # SDXLPipeline asks for its VAE in float32
    module = build_module(weights, device="cpu", dtype=torch.float32)
    state = module.state_dict()
    assert all(state[k].data_ptr() == b.data.ctypes.data for k, b in weights.tensors.items())


def test_legacy_clip_checkpoint_keys_are_renamed_like_transformers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # SDXL's real text_encoder checkpoints name tensors `text_model.…` (and older ones carry the
    # non-persistent position_ids); transformers 5's CLIPTextModel has neither in its state dict.
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "text_encoder" / "config.json", folder)
    state = load_file(tiny_model_dir / "text_encoder" / "model.safetensors")
    legacy = {f"text_model.{k}": v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(legacy, folder / "model.safetensors")

    weights = _load(tmp_path, "text_encoder")
    module = build_module(weights)
    reference = _reference(folder, weights)
    for ours, theirs in zip(
        _forward("text_encoder", module), _forward("text_encoder", reference), strict=True
    ):
        assert torch.equal(ours, theirs)
    blob = weights.tensors["text_model.final_layer_norm.weight"]
    assert module.state_dict()["final_layer_norm.weight"].data_ptr() == blob.data.ctypes.data


def test_state_dict_mismatches_are_named(tiny_weights: Any) -> None:
    weights = tiny_weights.components["text_encoder"]
    extra = copy.copy(weights)
    extra.tensors = {**weights.tensors, "bogus.weight": _blob(torch.ones(2))}
    error = _errors(lambda: build_module(extra))
    assert error.code == "weights_mismatch" and "bogus.weight" in error.message

    missing = copy.copy(weights)
    dropped = "final_layer_norm.weight"
    missing.tensors = {k: v for k, v in weights.tensors.items() if k != dropped}
    error = _errors(lambda: build_module(missing))
    assert error.code == "missing_weights" and dropped in error.message


def _blob(tensor: torch.Tensor) -> TensorBlob:
    from safetensors.torch import save

    return parse_safetensors(save({"t": tensor.contiguous()}), "t.safetensors")["t"]


def test_any_fsspec_url_is_a_source(tiny_model_dir: Path) -> None:
    memory = fsspec.filesystem("memory")
    memory.put(str(tiny_model_dir / "model_index.json"), "/weights-test/model_index.json")
    memory.put(str(tiny_model_dir / "vae"), "/weights-test/vae", recursive=True)
    weights = load_model(_config(source="memory://weights-test"), components=("vae",))
    reference = load_model(_config(), components=("vae",)).components["vae"]
    assert weights.components["vae"].tensors.keys() == reference.tensors.keys()
    assert all(
        np.array_equal(weights.components["vae"].tensors[k].data, b.data)
        for k, b in reference.tensors.items()
    )


def test_cast_on_build_copies_and_leaves_the_arrays_alone(tiny_weights: Any) -> None:
    weights = tiny_weights.components["vae"]
    before = {k: b.data.copy() for k, b in weights.tensors.items()}
    module = build_module(weights, dtype=torch.float16)
    assert {p.dtype for p in module.parameters()} == {torch.float16}
    pointers = {b.data.ctypes.data for b in weights.tensors.values()}
    assert not any(p.data_ptr() in pointers for p in module.parameters())
    assert all(np.array_equal(before[k], b.data) for k, b in weights.tensors.items())


def test_tokenizer_and_scheduler_rebuild(tiny_weights: Any, tiny_model_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    prompt = "a photo of a cat riding a dragon"
    for name in ("tokenizer", "tokenizer_2"):
        ours = build_tokenizer(tiny_weights.components[name])
        theirs = CLIPTokenizer.from_pretrained(tiny_model_dir / name)
        assert ours(prompt).input_ids == theirs(prompt).input_ids
        assert ours.pad_token == theirs.pad_token
    config = build_scheduler_config(tiny_weights.components["scheduler"])
    scheduler = EulerDiscreteScheduler.from_config(config)
    assert config["_class_name"] == "EulerDiscreteScheduler"
    assert scheduler.config.timestep_spacing == "leading"


# ------------------------------------------------------------------------------ formats


def test_bf16_round_trip_is_lossless(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "text_encoder" / "config.json", folder)
    original = load_file(tiny_model_dir / "text_encoder" / "model.safetensors")
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in original.items()}
    save_file(bf16, folder / "model.safetensors")

    weights = pickle.loads(pickle.dumps(_load(tmp_path, "text_encoder")))
    assert {b.dtype for b in weights.tensors.values()} == {"BF16"}
    module = build_module(weights)
    state = module.state_dict()
    for key, tensor in bf16.items():
        assert state[key].dtype == torch.bfloat16
        assert torch.equal(state[key].view(torch.int16), tensor.view(torch.int16)), key


def test_parser_keeps_every_dtype_bit_exact() -> None:
    from safetensors.torch import save

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(4),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    blobs = parse_safetensors(save(tensors), "mixed.safetensors")
    weights = ComponentWeights("x", "diffusers", "X", {}, blobs)
    from shared.engine.modules import _tensor_view

    for key, tensor in tensors.items():
        view = _tensor_view(weights.tensors[key])
        assert view.dtype == tensor.dtype and view.shape == tensor.shape
        assert torch.equal(view, tensor), key


def test_sharded_checkpoint_loads_like_the_single_file(
    tiny_weights: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "unet" / "config.json", folder)
    state = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for shard, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, folder / shard)
    weight_map = {k: shard for shard, ks in shards.items() for k in ks}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    sharded = _load(tmp_path, "unet")
    single = tiny_weights.components["unet"]
    assert sharded.tensors.keys() == single.tensors.keys()
    for key, blob in single.tensors.items():
        assert np.array_equal(sharded.tensors[key].data, blob.data), key
    build_module(sharded)

    weight_map["not.in.any.shard"] = next(iter(shards))
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    error = _errors(lambda: _load(tmp_path, "unet"))
    assert error.code == "missing_file" and "not.in.any.shard" in error.message


def test_variant_is_preferred_and_missing_variant_falls_back(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for folder, stem in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        state = load_file(model / folder / f"{stem}.safetensors")
        save_file(
            {k: v.half() for k, v in state.items()}, model / folder / f"{stem}.fp16.safetensors"
        )

    fp16 = load_model(
        _config(source=str(model), variant="fp16"), components=("vae", "text_encoder", "unet")
    )
    assert {b.dtype for b in fp16.components["vae"].tensors.values()} == {"F16"}
    assert {b.dtype for b in fp16.components["text_encoder"].tensors.values()} == {"F16"}
    assert {b.dtype for b in fp16.components["unet"].tensors.values()} == {"F32"}  # no fp16 file
    full = load_model(_config(source=f"file://{model}"), components=("vae",))
    assert {b.dtype for b in full.components["vae"].tensors.values()} == {"F32"}
    build_module(fp16.components["text_encoder"])


# ------------------------------------------------------------------------------ integrity


def test_truncated_file_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    weights_file = (
        _copy_component(tiny_model_dir, tmp_path, "vae") / "diffusion_pytorch_model.safetensors"
    )
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[:-10])
    error = _errors(lambda: _load(tmp_path, "vae"))
    assert error.code == "truncated"
    assert (
        "diffusion_pytorch_model.safetensors" in error.message and str(len(data)) in error.message
    )

    weights_file.write_bytes(data[:5])  # not even the header length survived
    assert _errors(lambda: _load(tmp_path, "vae")).code == "truncated"
    weights_file.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")
    assert _errors(lambda: _load(tmp_path, "vae")).code == "corrupt_file"


def test_pickle_weights_are_refused_unless_allowed(
    tiny_weights: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _copy_component(tiny_model_dir, tmp_path, "vae")
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")

    error = _errors(lambda: _load(tmp_path, "vae"))
    assert error.code == "pickle_refused"
    assert "safetensors" in error.message and "allow_pickle" in error.message

    weights = _load(tmp_path, "vae", allow_pickle=True)
    reference = tiny_weights.components["vae"]
    assert {k: (b.dtype, b.shape) for k, b in weights.tensors.items()} == {
        k: (b.dtype, b.shape) for k, b in reference.tensors.items()
    }
    ours = _forward("vae", build_module(weights))
    assert torch.equal(ours[0], _forward("vae", build_module(reference))[0])


def test_sha256_verified_and_mismatch_named(tiny_model_dir: Path) -> None:
    digest = hashlib.sha256((tiny_model_dir / VAE_FILE).read_bytes()).hexdigest()
    ok = load_model(_config(sha256={VAE_FILE: digest.upper()}), components=("vae",))
    assert "vae" in ok.components

    wrong = "0" * 64
    error = _errors(lambda: load_model(_config(sha256={VAE_FILE: wrong}), components=("vae",)))
    assert error.code == "checksum_mismatch"
    assert VAE_FILE in error.message and wrong in error.message and digest in error.message

    typo = {"vae/diffusion_pytorch_model.fp16.safetensors": digest}
    error = _errors(lambda: load_model(_config(sha256=typo), components=("vae",)))
    assert error.code == "checksum_unverified" and "fp16" in error.message


# ------------------------------------------------------------------------------ digests


def test_every_file_read_for_a_component_has_its_sha256(
    tiny_weights: Any, tiny_model_dir: Path
) -> None:
    digests = tiny_weights.digests
    assert set(digests) == set(tiny_weights.components)
    assert set(digests["unet"]) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    assert set(digests["scheduler"]) == {"scheduler/scheduler_config.json"}
    tokenizer_files = {f"tokenizer/{f.name}" for f in (tiny_model_dir / "tokenizer").iterdir()}
    assert set(digests["tokenizer"]) == tokenizer_files
    for files in digests.values():
        for rel, digest in files.items():
            assert digest == hashlib.sha256((tiny_model_dir / rel).read_bytes()).hexdigest()
    # Keyed as `sha256:` keys: pinning a model is pasting its digests there.
    pinned = {rel: d for files in digests.values() for rel, d in files.items()}
    assert load_model(_config(sha256=pinned), extra={"taesd": "taesd"}).digests == digests


def test_the_digests_of_another_source_are_under_the_component_name(
    tiny_model_dir: Path,
) -> None:
    weights = load_model(
        _config(), components=("scheduler",), extra={"preview": str(tiny_model_dir / "taesd")}
    )
    digest = hashlib.sha256((tiny_model_dir / "taesd/config.json").read_bytes()).hexdigest()
    assert weights.digests["preview"]["preview/config.json"] == digest


# ------------------------------------------------------------------------------ VAE override


def _vae_copy(tiny_model_dir: Path, folder: Path, scaling_factor: float) -> Path:
    shutil.copytree(tiny_model_dir / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": scaling_factor}))
    return folder


def test_vae_from_another_source_replaces_the_checkpoints(
    tiny_model_dir: Path, tiny_weights: Any, tmp_path: Path
) -> None:
    folder = _vae_copy(tiny_model_dir, tmp_path / "my-vae", 0.5)
    weights = load_suite(_config(vae=str(folder)))
    vae = weights.components["vae"]
    assert vae.class_name == "AutoencoderKL" and vae.config["scaling_factor"] == 0.5
    assert tiny_weights.components["vae"].config["scaling_factor"] == 0.13025
    assert _same_tensors(vae, tiny_weights.components["vae"])
    config_digest = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    assert vae.files_sha256["vae/config.json"] == config_digest  # the override's, not tiny's
    assert build_module(vae).config.scaling_factor == 0.5


def test_vae_from_a_subfolder_and_a_checkpoint_without_its_own(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("vae"))
    _vae_copy(tiny_model_dir, model / "vae_fix", 0.25)
    weights = load_suite(_config(source=str(model), vae="vae_fix"))
    vae = weights.components["vae"]
    assert vae.config["scaling_factor"] == 0.25
    assert set(vae.files_sha256) == {"vae_fix/config.json", VAE_FILE.replace("vae/", "vae_fix/")}
    error = _errors(lambda: load_suite(_config(source=str(model))))  # no vae/, no override
    assert error.code == "missing_file" and "vae" in error.message


def test_a_missing_vae_override_fails_the_load_naming_it(tmp_path: Path) -> None:
    error = _errors(lambda: load_suite(_config(vae="no-such-vae")))
    assert error.code == "model_not_found"
    assert "vae of model 'm' is 'no-such-vae'" in error.message and "no-such-vae" in error.message
    (tmp_path / "empty").mkdir()
    error = _errors(lambda: load_suite(_config(vae=str(tmp_path / "empty"))))
    assert error.code == "missing_file" and f"{tmp_path}/empty/config.json" in error.message


# ------------------------------------------------------------------------------ sources


def test_missing_sources_and_components(tiny_model_dir: Path, tmp_path: Path) -> None:
    error = _errors(lambda: load_model(_config(source=str(tmp_path / "nowhere"))))
    assert error.code == "model_not_found" and "nowhere" in error.message
    assert _errors(lambda: open_source("not a source!")).code == "model_not_found"

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("vae"))
    error = _errors(lambda: load_model(_config(source=str(model)), components=("vae",)))
    assert error.code == "missing_file" and "vae" in error.message

    error = _errors(lambda: load_model(_config(source=str(model)), components=("transformer",)))
    assert error.code == "missing_file" and "transformer" in error.message
    # model_index.json declares image_encoder empty ([null, null]): left out, as diffusers does.
    assert not load_model(_config(source=str(model)), components=("image_encoder",)).components


def test_missing_extra_is_absent_not_an_error(tiny_model_dir: Path) -> None:
    weights = load_model(
        _config(), components=("scheduler",), extra={"taesd": "taesd", "other": "no-org/no-model"}
    )
    assert set(weights.components) == {"scheduler", "taesd"}


def test_extra_from_another_source(tiny_model_dir: Path) -> None:
    weights = load_model(
        _config(), components=("scheduler",), extra={"preview": str(tiny_model_dir / "taesd")}
    )
    assert weights.components["preview"].class_name == "AutoencoderTiny"


def test_hub_id_offline_fails_fast_with_a_clear_error() -> None:
    started = time.monotonic()
    error = _errors(lambda: open_source("some-org/some-model"))
    assert time.monotonic() - started < 10
    assert error.code == "model_not_found"
    assert "some-org/some-model" in error.message and "HF_HUB_OFFLINE" in error.message


def _hub_cache(folder: Path, cache_dir: Path, repo_id: str) -> None:
    """`folder` as a Hub download leaves it in `cache_dir`: refs/main -> snapshots/<commit>/,
    whose entries are symlinks into blobs/."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    for file in (f for f in folder.rglob("*") if f.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_served_from_the_local_cache_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    _hub_cache(tiny_model_dir, tmp_path, "some-org/tiny-sdxl")
    config = _config(source="some-org/tiny-sdxl", storage_options={"cache_dir": str(tmp_path)})
    weights = load_model(config, components=("vae", "tokenizer"), extra={"taesd": "taesd"})
    assert set(weights.components) == {"vae", "tokenizer", "taesd"}


# ------------------------------------------------------------------------------ S3


def _only(*folders: str) -> Any:
    """An upload filter keeping model_index.json and the given component folders."""

    def keep(rel: str, data: bytes) -> bytes | None:
        return data if rel == "model_index.json" or rel.split("/")[0] in folders else None

    return keep


def test_s3_load_matches_local_and_reads_each_object_once(
    s3_server: S3Server, s3_tiny_url: str, tiny_weights: Any
) -> None:
    s3_server.clear_log()
    config = _config(source=s3_tiny_url, storage_options=s3_server.storage_options())
    remote = load_model(config, extra={"taesd": "taesd"})

    assert remote.components.keys() == tiny_weights.components.keys()
    for name, local in tiny_weights.components.items():
        ours = remote.components[name]
        assert (ours.class_name, ours.config, ours.files) == (
            local.class_name,
            local.config,
            local.files,
        )
        for key, blob in local.tensors.items():
            assert ours.tensors[key].dtype == blob.dtype
            assert np.array_equal(ours.tensors[key].data, blob.data), (name, key)
    assert remote.digests == tiny_weights.digests  # hashed from the one read of each object
    gets = s3_server.object_gets(s3_tiny_url)
    assert len(gets) == len(set(gets)) == 16  # model_index + 15 component files, once each


def test_s3_missing_objects(s3_server: S3Server, tiny_model_dir: Path) -> None:
    options = s3_server.storage_options()
    missing_prefix = _errors(
        lambda: load_model(_config(source="s3://models/absent", storage_options=options))
    )
    assert missing_prefix.code == "model_not_found"
    assert "s3://models/absent/model_index.json" in missing_prefix.message

    url = "s3://models/no-vae-weights"
    keep = _only("vae")
    s3_server.upload_folder(
        tiny_model_dir, url, lambda rel, data: None if rel == VAE_FILE else keep(rel, data)
    )
    error = _errors(
        lambda: load_model(_config(source=url, storage_options=options), components=("vae",))
    )
    assert error.code == "missing_file" and f"{url}/vae" in error.message


def test_s3_checksum_mismatch(s3_server: S3Server, tiny_model_dir: Path) -> None:
    url = "s3://models/checksum"
    s3_server.upload_folder(tiny_model_dir, url, _only("vae"))
    digest = hashlib.sha256((tiny_model_dir / VAE_FILE).read_bytes()).hexdigest()
    options = s3_server.storage_options()

    ok = load_model(
        _config(source=url, storage_options=options, sha256={VAE_FILE: digest}), components=("vae",)
    )
    assert "vae" in ok.components
    bad = _config(source=url, storage_options=options, sha256={VAE_FILE: "f" * 64})
    error = _errors(lambda: load_model(bad, components=("vae",)))
    assert (
        error.code == "checksum_mismatch" and VAE_FILE in error.message and digest in error.message
    )


def test_s3_truncated_object(s3_server: S3Server, tiny_model_dir: Path) -> None:
    url = "s3://models/truncated"
    keep = _only("vae")
    s3_server.upload_folder(
        tiny_model_dir,
        url,
        lambda rel, data: data[: len(data) // 2] if rel == VAE_FILE else keep(rel, data),
    )
    config = _config(source=url, storage_options=s3_server.storage_options())
    error = _errors(lambda: load_model(config, components=("vae",)))
    assert error.code == "truncated" and f"{url}/{VAE_FILE}" in error.message


def test_s3_unreachable_endpoint_fails_fast_without_echoing_credentials(
    s3_server: S3Server,
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = "do-not-print-this-secret"
    options = s3_server.storage_options(
        endpoint_url=f"http://127.0.0.1:{port}", key="AKIAEXAMPLE", secret=secret
    )
    started = time.monotonic()
    error = _errors(lambda: load_model(_config(source="s3://models/tiny", storage_options=options)))
    assert time.monotonic() - started < 15
    assert error.code == "source_unreachable" and secret not in error.message


def test_a_process_without_an_assigned_gpu_runs_on_the_cpu() -> None:
    assert pick_device(0) == "cpu"  # even on a GPU node: Ray gave this process no GPU
    assert pick_device(1) == ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------ IP-Adapter, built-ins


def _adapter_config(adapter_source: str = "tiny-ip-adapter", **kwargs: Any) -> ModelConfig:
    adapter = {"source": adapter_source, **kwargs.pop("adapter", {})}
    return _config(ip_adapter=adapter, **kwargs)


def _same_tensors(ours: ComponentWeights, theirs: ComponentWeights) -> bool:
    return ours.tensors.keys() == theirs.tensors.keys() and all(
        np.array_equal(ours.tensors[k].data, b.data) for k, b in theirs.tensors.items()
    )


@pytest.fixture(scope="module")
def adapter_dir() -> Path:
    return resolve_builtin("tiny-ip-adapter")


def test_ip_adapter_loads_from_the_builtin_and_a_local_copy(
    adapter_dir: Path, tmp_path: Path
) -> None:
    builtin = load_suite(_adapter_config())
    assert set(builtin.components) == {*SDXL_COMPONENTS, "taesd", "image_encoder", "ip_adapter"}
    encoder, adapter = builtin.components["image_encoder"], builtin.components["ip_adapter"]
    assert encoder.class_name == "CLIPVisionModelWithProjection"
    assert encoder.config["projection_dim"] == 32  # text_encoder_2's, so the spaces match
    assert "preprocessor_config.json" in encoder.files
    assert {k.split(".")[0] for k in adapter.tensors} == {"image_proj", "ip_adapter"}
    assert "ip_adapter.1.to_k_ip.weight" in adapter.tensors  # diffusers' odd key ids
    pickle.loads(pickle.dumps(adapter, protocol=5))
    assert "image_encoder" not in load_suite(_config()).components  # only when configured

    shutil.copytree(adapter_dir, tmp_path / "adapter")
    local = load_ip_adapter(_adapter_config(str(tmp_path / "adapter")))
    assert _same_tensors(local["image_encoder"], encoder)
    assert _same_tensors(local["ip_adapter"], adapter)


def test_missing_ip_adapter_files_fail_the_load_naming_them(
    adapter_dir: Path, tmp_path: Path
) -> None:
    config = _adapter_config(adapter={"weight_name": "sdxl_models/ip-adapter-nope.safetensors"})
    error = _errors(lambda: load_suite(config))
    assert (
        error.code == "missing_file" and "sdxl_models/ip-adapter-nope.safetensors" in error.message
    )

    copy_dir = tmp_path / "adapter"
    shutil.copytree(adapter_dir, copy_dir)
    shutil.rmtree(copy_dir / IP_ADAPTER_IMAGE_ENCODER)
    error = _errors(lambda: load_ip_adapter(_adapter_config(str(copy_dir))))
    assert error.code == "missing_file" and IP_ADAPTER_IMAGE_ENCODER in error.message
    error = _errors(lambda: load_ip_adapter(_adapter_config(str(tmp_path / "nowhere"))))
    assert error.code == "model_not_found" and "nowhere" in error.message

    other = tmp_path / "other"
    shutil.copytree(adapter_dir, other)
    save_file({"other.weight": torch.ones(2)}, other / "not-an-adapter.safetensors")
    config = _adapter_config(str(other), adapter={"weight_name": "not-an-adapter.safetensors"})
    error = _errors(lambda: load_ip_adapter(config))
    assert error.code == "weights_mismatch" and "not-an-adapter" in error.message


def test_ip_adapter_pickle_refused_unless_allowed(adapter_dir: Path, tmp_path: Path) -> None:
    # h94's .bin adapters nest the state dict: {"image_proj": {...}, "ip_adapter": {...}}.
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir, folder)
    flat = load_file(folder / IP_ADAPTER_WEIGHTS)
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in flat.items():
        group, _, name = key.partition(".")
        nested[group][name] = tensor
    torch.save(nested, folder / "sdxl_models" / "ip-adapter_sdxl.bin")
    weight_name = {"weight_name": "sdxl_models/ip-adapter_sdxl.bin"}

    error = _errors(lambda: load_ip_adapter(_adapter_config(str(folder), adapter=weight_name)))
    assert error.code == "pickle_refused" and "allow_pickle" in error.message
    allowed = _adapter_config(str(folder), adapter=weight_name, allow_pickle=True)
    reference = load_ip_adapter(_adapter_config())["ip_adapter"]
    assert _same_tensors(load_ip_adapter(allowed)["ip_adapter"], reference)


def test_ip_adapter_checksums_are_under_the_ip_adapter_prefix(adapter_dir: Path) -> None:
    key = f"ip_adapter/{IP_ADAPTER_WEIGHTS}"
    digest = hashlib.sha256((adapter_dir / IP_ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    assert load_ip_adapter(_adapter_config(sha256={key: digest}))
    error = _errors(lambda: load_ip_adapter(_adapter_config(sha256={key: "0" * 64})))
    assert error.code == "checksum_mismatch" and IP_ADAPTER_WEIGHTS in error.message
    typo = {"ip_adapter/sdxl_models/ip-adapter_sdxl.bin": digest}
    assert _errors(lambda: load_ip_adapter(_adapter_config(sha256=typo))).code == (
        "checksum_unverified"
    )


def test_ip_adapter_from_s3_reads_only_its_files(
    s3_server: S3Server, s3_tiny_url: str, adapter_dir: Path
) -> None:
    url = "s3://models/tiny-ip-adapter"
    s3_server.upload_folder(adapter_dir, url)
    s3_server.clear_log()
    options = s3_server.storage_options()  # the model's, reused for a source of the same kind
    config = _adapter_config(url, source=s3_tiny_url, storage_options=options)
    remote = load_ip_adapter(config)
    local = load_ip_adapter(_adapter_config())
    assert all(_same_tensors(remote[name], local[name]) for name in local)
    assert remote["image_encoder"].files == local["image_encoder"].files
    gets = s3_server.object_gets(url)
    assert len(gets) == len(set(gets)) == 4  # weights + image encoder's 3 files, once each


def test_ip_adapter_from_the_hub_downloads_only_its_files(
    adapter_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from huggingface_hub.utils import filter_repo_objects

    config = _adapter_config(
        "some-org/tiny-ip-adapter",
        source=str(tiny_model_dir),
        storage_options={"cache_dir": str(tmp_path)},
    )
    # h94/IP-Adapter holds many adapters and encoders; only this one's files are fetched.
    repo_files = [
        "models/ip-adapter_sd15.safetensors",
        "models/image_encoder/model.safetensors",
        "sdxl_models/ip-adapter_sdxl.bin",
        "sdxl_models/ip-adapter_sdxl.safetensors",
        "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
        "sdxl_models/image_encoder/config.json",
        "sdxl_models/image_encoder/model.safetensors",
        "sdxl_models/image_encoder/pytorch_model.bin",
    ]
    fetched = filter_repo_objects(repo_files, allow_patterns=ip_adapter_hub_patterns(config))
    assert sorted(fetched) == [
        "sdxl_models/image_encoder/config.json",
        "sdxl_models/image_encoder/model.safetensors",
        "sdxl_models/ip-adapter_sdxl.safetensors",
    ]
    _hub_cache(adapter_dir, tmp_path, "some-org/tiny-ip-adapter")
    hub = load_ip_adapter(config)
    assert _same_tensors(hub["ip_adapter"], load_ip_adapter(_adapter_config())["ip_adapter"])


def test_tiny_inpaint_is_tiny_with_a_nine_channel_unet(tiny_weights: Any) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline

    weights = load_model(_config(source="tiny-inpaint"), components=("unet", "text_encoder"))
    unet = weights.components["unet"]
    assert unet.config["in_channels"] == 9 and unet.config["out_channels"] == 4
    assert unet.tensors["conv_in.weight"].shape[1] == 9
    assert _same_tensors(
        weights.components["text_encoder"], tiny_weights.components["text_encoder"]
    )
    assert build_module(unet).config.in_channels == 9
    folder = resolve_builtin("tiny-inpaint")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionXLInpaintPipeline"
    )
    StableDiffusionXLInpaintPipeline.from_pretrained(folder)  # loads like the real checkpoint
    assert _errors(lambda: open_source("tiny-nope")).code == "model_not_found"
    with pytest.raises(ValueError, match="tiny-ip-adapter"):
        resolve_builtin("tiny-nope")

"""App-args validation (the checked-in YAML files included) and request validation at the edge."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.api.schemas import GenerateRequest
from shared.config import AppConfig, ControlNetConfig, LimitsConfig, ModelConfig
from shared.errors import InvalidRequestError, MalformedRequestError, PayloadTooLargeError
from shared.intake.json_body import parse_json_object
from shared.intake.resolve import (
    check_remote_request,
    parse_request,
    resolve_request,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "serve_config.yaml", *sorted((REPO / "cluster").glob("serve_config*.yaml"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_checked_in_configs_validate(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    for app in config["applications"]:
        assert app["import_path"] == "deployments.app:build_app"
        parsed = AppConfig.model_validate(app["args"])
        options = parsed.pipeline_deployment.serve_options()
        assert options["max_queued_requests"] > 0
        assert options["graceful_shutdown_timeout_s"] > 0


def test_default_config_is_cpu_tiny_with_autoscaling() -> None:
    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    parsed = AppConfig.model_validate(args)
    assert [m.source for m in parsed.models] == ["tiny", "tiny-inpaint"]
    assert parsed.models[0].ip_adapter is not None  # image prompts work from the default app
    pipeline = parsed.pipeline_deployment.serve_options()
    assert pipeline["ray_actor_options"]["num_gpus"] == 0
    assert pipeline["autoscaling_config"]["min_replicas"] == 1
    assert pipeline["autoscaling_config"]["max_replicas"] == 2
    assert "resources" not in pipeline["ray_actor_options"]  # Ray's default: none


def test_custom_resources_reach_ray_actor_options() -> None:
    parsed = AppConfig.model_validate(
        {
            "models": [{"id": "t", "source": "tiny"}],
            "cache_deployment": {"num_cpus": 0.1, "resources": {"cpu_pool": 0.01}},
        }
    )
    actor = parsed.cache_deployment.serve_options()["ray_actor_options"]
    assert actor == {"num_cpus": 0.1, "num_gpus": 0, "resources": {"cpu_pool": 0.01}}
    for wrong, message in (({"GPU": 1}, "num_cpus/num_gpus"), ({"cpu_pool": 0}, "positive")):
        args = {"models": [{"id": "t", "source": "tiny"}], "cache_deployment": {"resources": wrong}}
        with pytest.raises(ValueError, match=message):
            AppConfig.model_validate(args)


def test_typos_fail_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="max_stepz"):
        AppConfig.model_validate(
            {"models": [{"id": "t", "source": "tiny"}], "limits": {"max_stepz": 3}}
        )
    with pytest.raises(ValueError, match="unique"):
        AppConfig.model_validate({"models": [{"id": "t", "source": "tiny"}] * 2})
    with pytest.raises(ValueError, match="min_side"):
        LimitsConfig(min_side=512, max_side=256)


MODEL = ModelConfig(id="tiny", source="tiny", default_width=64, default_height=64, default_steps=8)
LIMITS = LimitsConfig(max_side=512, max_pixels=512 * 512, max_steps=50, max_n=4)


def resolve(**fields: object) -> GenerateRequest:
    request = parse_request({"model": "tiny", "prompt": "a cat", **fields})
    return resolve_request(request, MODEL, LIMITS)


def test_defaults_come_from_the_model() -> None:
    request = resolve()
    assert (request.width, request.height, request.steps) == (64, 64, 8)
    assert request.seed is not None and request.scheduler is None


def test_unset_sizes_come_from_the_checkpoint_not_from_the_tiny_model() -> None:
    model = ModelConfig(id="sdxl", source="stabilityai/stable-diffusion-xl-base-1.0")
    assert (model.default_width, model.default_height, model.default_steps) == (None, None, 30)
    limits = LimitsConfig()
    request = parse_request({"model": "sdxl", "prompt": "a cat"})

    resolved = resolve_request(request, model, limits, checkpoint_size=(1024, 1024))
    assert (resolved.width, resolved.height, resolved.steps) == (1024, 1024, 30)
    wide = parse_request({"model": "sdxl", "prompt": "a cat", "width": 1152})
    resolved = resolve_request(wide, model.model_copy(update={"default_height": 896}), limits)
    assert (resolved.width, resolved.height) == (1152, 896)  # nothing left for the checkpoint


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"height": 1000}, "height", "multiple of 8 between 64 and 512; got 1000"),
        ({"width": 520}, "width", "got 520"),
        ({"steps": 51}, "steps", "between 1 and 50"),
        ({"n": 5}, "n", "between 1 and 4"),
        ({"guidance_scale": -1}, "guidance_scale", "got -1"),
        ({"scheduler": "bogus"}, "scheduler", "euler"),
        ({"prompt": "p" * 2001}, "prompt", "2001 characters"),
    ],
)
def test_limits_are_enforced_with_teaching_messages(
    fields: dict, param: str, fragment: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve(**fields)
    assert info.value.param == param and fragment in info.value.message
    assert info.value.status == 422


def test_pixel_budget_is_separate_from_sides() -> None:
    limits = LimitsConfig(max_side=512, max_pixels=256 * 256)
    request = parse_request({"model": "tiny", "prompt": "a", "width": 512, "height": 512})
    with pytest.raises(InvalidRequestError, match="262144 pixels"):
        resolve_request(request, MODEL, limits)


def test_schema_errors_become_picklable_errors() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"model": "tiny", "prompt": "a", "stepz": 3})
    assert info.value.code == "unknown_field" and info.value.param == "stepz"
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is InvalidRequestError and clone.to_dict() == info.value.to_dict()
    with pytest.raises(InvalidRequestError) as missing:
        parse_request({"model": "tiny"})
    assert missing.value.code == "missing_field" and missing.value.param == "prompt"


def test_bodies_are_parsed_strictly() -> None:
    limits = LimitsConfig(max_body_bytes=1024)
    assert parse_json_object(b'{"a": 1}', limits) == {"a": 1}
    with pytest.raises(MalformedRequestError):
        parse_json_object(b"{oops", limits)
    with pytest.raises(MalformedRequestError):
        parse_json_object(b"[]", limits)
    with pytest.raises(PayloadTooLargeError):
        parse_json_object(b" " * 1025, limits)


def test_rayservice_manifest_embeds_a_valid_app() -> None:
    manifest = yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    parsed = AppConfig.model_validate(app["args"])
    assert parsed.pipeline_deployment.num_gpus == 1
    # The cache is pinned to a resource only the head node offers.
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    (pin,) = parsed.cache_deployment.resources
    assert json.loads(json.loads(head["resources"])) == {pin: 1}


CONTROLLED = MODEL.model_copy(
    update={"controlnets": [ControlNetConfig(id="tiny-canny", source="tiny-controlnet")]}
)
CONTROL = {"id": "tiny-canny", "image": "aGk="}  # never decoded by these checks


def resolve_controlled(*controls: dict[str, Any]) -> GenerateRequest:
    request = parse_request({"model": "tiny", "prompt": "a cat", "controlnet": list(controls)})
    return resolve_request(request, CONTROLLED, LIMITS)


def test_controlnet_entries_take_their_defaults() -> None:
    (control,) = resolve_controlled(CONTROL).controlnet
    assert control.model_dump() == {
        **CONTROL,
        "scale": 1.0,
        "start": 0.0,
        "end": 1.0,
        "preprocessor": "none",
        "low_threshold": 100,
        "high_threshold": 200,
    }
    assert resolve().controlnet == []


@pytest.mark.parametrize(
    ("controls", "code", "param", "fragment"),
    [
        ([{**CONTROL, "id": "nope"}], "unknown_controlnet", "controlnet.0.id", "tiny-canny"),
        ([CONTROL] * 2, "invalid_value", "controlnet", "once"),
        ([{**CONTROL, "start": 0.5, "end": 0.5}], "invalid_value", "controlnet.0.end", "above"),
        ([{**CONTROL, "preprocessor": "depth"}], "invalid_value", "controlnet.0.preprocessor", ""),
        ([{**CONTROL, "scale": 2.5}], "invalid_value", "controlnet.0.scale", ""),
        (
            [{**CONTROL, "low_threshold": 150, "high_threshold": 100}],
            "invalid_value",
            "controlnet.0.high_threshold",
            "at least low_threshold (150)",
        ),
        ([{**CONTROL, "high_threshold": 256}], "invalid_value", "controlnet.0.high_threshold", ""),
        ([{"id": "tiny-canny"}], "missing_field", "controlnet.0.image", ""),
    ],
)
def test_bad_controlnet_entries_are_refused_naming_the_entry(
    controls: list[dict[str, object]], code: str, param: str, fragment: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_controlled(*controls)
    assert (info.value.status, info.value.code, info.value.param) == (422, code, param)
    assert fragment in info.value.message


def test_too_many_controlnets_are_refused() -> None:
    limits = LIMITS.model_copy(update={"max_controlnets": 1})
    request = parse_request(
        {"model": "tiny", "prompt": "a", "controlnet": [CONTROL, {**CONTROL, "id": "other"}]}
    )
    with pytest.raises(InvalidRequestError) as info:
        resolve_request(request, CONTROLLED, limits)
    assert (info.value.code, info.value.param) == ("too_many_controlnets", "controlnet")
    assert "the limit is 1" in info.value.message
    with pytest.raises(ValueError, match="max_controlnets"):
        LimitsConfig(max_controlnets=9)


def test_a_provider_model_refuses_controlnet() -> None:
    request = parse_request({"model": "cloud/gpt-image-1", "prompt": "a", "controlnet": [CONTROL]})
    with pytest.raises(InvalidRequestError) as info:
        check_remote_request(request, LIMITS)
    assert (info.value.code, info.value.param) == ("unsupported_for_provider", "controlnet.0.image")

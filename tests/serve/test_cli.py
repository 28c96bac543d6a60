"""The `diffusion-serve` CLI against the running default app over real HTTP: the image it saves
is the one the API returns (for `generate` and for `edit`'s inpainting), previews land as the
steps arrive, and every failure is one line with its exit code."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from typer.testing import CliRunner

from shared.cli import app
from tests.serve.test_http import decode
from tests.serve.test_image_inputs import picture, png, right_half_mask

runner = CliRunner()


def test_generate_saves_the_image_and_the_previews(app_url: str, tmp_path: Path) -> None:
    out, previews = tmp_path / "cat.png", tmp_path / "previews"
    args = ["generate", "a photo of a cat", "--url", app_url, "--size", "96x64", "--steps", "5",
            "--seed", "21", "--out", str(out), "--preview-dir", str(previews)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout and "seed 21" in result.stdout
    saved = Image.open(out)
    assert saved.format == "PNG" and saved.size == (96, 64)
    api = httpx.post(
        f"{app_url}/v1/generate",
        json={"model": "tiny", "prompt": "a photo of a cat", "width": 96, "height": 64,
              "steps": 5, "seed": 21},
        timeout=120,
    ).json()  # fmt: skip
    assert np.array_equal(np.asarray(saved), np.asarray(decode(api["images"][0]["b64"])))
    assert sorted(p.name for p in previews.iterdir()) == [
        f"step-{i:04d}-0.jpeg" for i in range(1, 6)
    ]


def test_several_images_get_numbered_files(app_url: str, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    args = ["generate", "a fox", "--url", app_url, "--steps", "2", "--n", "2", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-0.png", "fox-1.png"]


def test_failures_are_one_line_with_an_exit_code(app_url: str, tmp_path: Path) -> None:
    refused = runner.invoke(app, ["generate", "a cat", "--url", app_url, "--steps", "5000"])
    assert refused.exit_code == 2
    assert "invalid_value" in refused.output and "steps" in refused.output
    unknown = runner.invoke(app, ["generate", "a cat", "--url", app_url, "--model", "nope"])
    assert unknown.exit_code == 2 and "model_not_found" in unknown.output
    unreachable = runner.invoke(app, ["health", "--url", _closed_url()])
    assert unreachable.exit_code == 4 and "cannot reach" in unreachable.output


def _closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_edit_with_a_mask_equals_the_api_at_the_images_size(app_url: str, tmp_path: Path) -> None:
    image, mask, out = tmp_path / "house.png", tmp_path / "mask.png", tmp_path / "edited.png"
    picture(96, 72).save(image)
    right_half_mask(96, 72).save(mask)
    args = ["edit", str(image), "a red door", "--mask", str(mask), "--mask-blur", "2",
            "--steps", "4", "--seed", "8", "--url", app_url, "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = Image.open(out)
    assert saved.format == "PNG" and saved.size == (96, 72)
    api = httpx.post(
        f"{app_url}/v1/generate",
        json={"model": "tiny", "prompt": "a red door", "init_image": png(picture(96, 72)),
              "mask": png(right_half_mask(96, 72)), "mask_blur": 2, "steps": 4, "seed": 8},
        timeout=120,
    ).json()  # fmt: skip
    assert np.array_equal(np.asarray(saved), np.asarray(decode(api["images"][0]["b64"])))


def test_edit_without_a_mask_runs_strength_of_the_steps(app_url: str, tmp_path: Path) -> None:
    image, previews = tmp_path / "house.png", tmp_path / "previews"
    picture().save(image)
    args = ["edit", str(image), "a house in the snow", "--strength", "0.5", "--steps", "6",
            "--url", app_url, "--out", str(tmp_path / "snow.png"),
            "--preview-dir", str(previews)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # int(6 * 0.5): one step event, so one preview, per step the server ran.
    assert sorted(p.name for p in previews.iterdir()) == [f"step-{i:04d}-0.jpeg" for i in (1, 2, 3)]
    assert Image.open(tmp_path / "snow.png").size == (64, 64)


def test_edit_failures_are_one_line_with_an_exit_code(app_url: str, tmp_path: Path) -> None:
    gif, image = tmp_path / "house.gif", tmp_path / "house.png"
    picture().save(gif, format="GIF")
    picture().save(image)
    refused = runner.invoke(app, ["edit", str(gif), "a house", "--url", app_url])
    assert refused.exit_code == 2 and "unsupported_image" in refused.stderr
    assert "GIF" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    wrong_size = tmp_path / "small-mask.png"
    right_half_mask(32, 32).save(wrong_size)
    mismatched = runner.invoke(
        app, ["edit", str(image), "a house", "--mask", str(wrong_size), "--url", app_url]
    )
    assert mismatched.exit_code == 2 and "mask_size_mismatch" in mismatched.stderr
    # A closed port: a missing file fails before the server would be contacted (exit 4).
    closed = _closed_url()
    for args in ([str(tmp_path / "nope.png")], [str(image), "--mask", str(tmp_path / "no.png")]):
        missing = runner.invoke(app, ["edit", args[0], "a house", *args[1:], "--url", closed])
        assert missing.exit_code == 2, missing.output
        assert "No such file" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_generate_with_the_refiner_and_a_controlnet_equals_the_api(
    app_url: str, tmp_path: Path
) -> None:
    control, out = tmp_path / "control.png", tmp_path / "refined.png"
    picture().save(control)
    args = ["generate", "a lighthouse", "--refiner", "--switch-at", "0.6",
            "--controlnet", "tiny-canny", "--control-image", str(control), "--canny",
            "--control-scale", "0.7", "--steps", "6", "--seed", "9", "--url", app_url,
            "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    api = httpx.post(
        f"{app_url}/v1/generate",
        json={"model": "tiny", "prompt": "a lighthouse", "steps": 6, "seed": 9,
              "refiner": {"switch_at": 0.6},
              "controlnet": [{"id": "tiny-canny", "image": png(picture()),
                              "preprocessor": "canny", "scale": 0.7}]},
        timeout=120,
    ).json()  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(decode(api["images"][0]["b64"])))
    missing = runner.invoke(app, ["generate", "x", "--controlnet", "tiny-canny", "--url", app_url])
    assert missing.exit_code == 2 and "--control-image" in missing.output


def test_models_and_health(app_url: str) -> None:
    listed = runner.invoke(app, ["models", "--url", app_url])
    assert listed.exit_code == 0 and "tiny" in listed.stdout and "cached" in listed.stdout
    healthy = runner.invoke(app, ["health", "--url", app_url])
    assert healthy.exit_code == 0 and healthy.stdout.strip() == "ready"

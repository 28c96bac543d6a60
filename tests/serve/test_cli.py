"""The `diffusion-serve` CLI against the running default app over real HTTP: the image it saves
is the one the API returns, previews land as the steps arrive, and every failure is one line
with its exit code."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from typer.testing import CliRunner

from shared.cli import app
from tests.serve.test_http import decode

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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    unreachable = runner.invoke(app, ["health", "--url", closed])
    assert unreachable.exit_code == 4 and "cannot reach" in unreachable.output


def test_models_and_health(app_url: str) -> None:
    listed = runner.invoke(app, ["models", "--url", app_url])
    assert listed.exit_code == 0 and "tiny" in listed.stdout and "cached" in listed.stdout
    healthy = runner.invoke(app, ["health", "--url", app_url])
    assert healthy.exit_code == 0 and healthy.stdout.strip() == "ready"

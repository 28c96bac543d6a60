"""The layout's rule, checked in fresh interpreters: the Router, the app builder, the API contract,
the config and the weights loader import neither torch nor diffusers (nor transformers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_STACK = ("torch", "diffusers", "transformers")
TORCH_FREE = [
    "deployments.router",
    "deployments.app",
    "shared.api.routes",
    "shared.api.http_errors",
    "shared.api.openai_images",
    "shared.intake.resolve",
    "shared.intake.images",
    "shared.intake.request_images",
    "shared.config",
    "shared.weights.loader",
    "shared.weights.store",
    "shared.providers",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_does_not_load_the_gpu_stack(module: str) -> None:
    script = f"import sys, {module}\nprint(','.join(m for m in {GPU_STACK!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"importing {module} loaded {loaded}"


def test_the_engine_does_load_it() -> None:
    """The check above can fail: importing the engine really loads torch and diffusers."""
    script = (
        "import sys, shared.engine.sdxl\nprint('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "True"]

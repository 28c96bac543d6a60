"""Session-wide test settings: no network for models, quiet libraries, the built-in tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Provider clients refuse any non-loopback host: no test may reach the internet.
os.environ["DIFFUSION_SERVE_LOOPBACK_ONLY"] = "1"

# Keys of the fake cloud providers, set before Ray starts so every replica inherits them.
FAKE_KEYS = {"DS_TEST_OPENAI_KEY": "sk-test-openai", "DS_TEST_RUNWARE_KEY": "rw-test-key"}
os.environ.update(FAKE_KEYS)

pytest_plugins = ["tests.s3_server"]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built-in tiny SDXL in diffusers layout (built once per cache dir)."""
    from shared.weights.builtin import resolve_builtin

    return resolve_builtin("tiny")

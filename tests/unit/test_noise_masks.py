"""Noise-injection mask patterns (shared/intake/noise_masks.py): well-formed at any size, the shapes
their names promise, a catalog with decodable previews, and a 422 for an unknown name."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from shared.errors import InvalidRequestError
from shared.intake.noise_masks import (
    NOISE_MASK_NAMES,
    NOISE_MASK_PATTERNS,
    pattern_catalog,
    pattern_mask,
)

SIZES = [(8, 8), (64, 64), (96, 40), (40, 96), (1024, 768)]


@pytest.mark.parametrize("name", NOISE_MASK_NAMES)
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_every_pattern_is_a_valid_mask(name: str, width: int, height: int) -> None:
    mask = pattern_mask(name, width, height)
    assert mask.dtype == np.float32 and mask.shape == (height, width)
    assert mask.flags.c_contiguous and mask.flags.writeable
    assert 0.0 <= mask.min() < mask.max() <= 1.0
    assert np.array_equal(mask, pattern_mask(name, width, height))


def test_there_are_nine_named_patterns_in_a_stable_order() -> None:
    assert len(NOISE_MASK_NAMES) == 9 == len(set(NOISE_MASK_NAMES))
    assert tuple(NOISE_MASK_PATTERNS) == NOISE_MASK_NAMES
    assert NOISE_MASK_NAMES[:3] == ("circle", "square", "edges")
    assert all(pattern.description for pattern in NOISE_MASK_PATTERNS.values())


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_shapes_are_where_their_names_say(width: int, height: int) -> None:
    cy, cx = height // 2, width // 2
    corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)]
    for name in ("circle", "square", "diamond", "radial"):
        mask = pattern_mask(name, width, height)
        assert mask[cy, cx] > 0.9, name
        assert all(mask[c] == 0 for c in corners), name
    edges = pattern_mask("edges", width, height)
    assert edges[cy, cx] == 0
    assert edges[0].all() and edges[-1].all() and edges[:, 0].all() and edges[:, -1].all()
    ring = pattern_mask("ring", width, height)
    assert ring[cy, cx] == 0 and all(ring[c] == 0 for c in corners) and ring.max() == 1
    gradient = pattern_mask("gradient", width, height)
    assert (gradient[:, 0] == 0).all() and (gradient[:, -1] == 1).all()
    assert (np.diff(gradient, axis=1) > 0).all()
    vertical = pattern_mask("vertical_gradient", width, height)
    assert (vertical[0] == 0).all() and (vertical[-1] == 1).all()
    checker = pattern_mask("checkerboard", width, height)
    assert set(np.unique(checker)) == {0.0, 1.0} and abs(checker.mean() - 0.5) < 0.1


def test_a_circle_stays_round_on_a_wide_image() -> None:
    mask = pattern_mask("circle", 200, 100)
    rows, cols = np.nonzero(mask)
    assert abs((cols.max() - cols.min()) - (rows.max() - rows.min())) <= 1


def test_shapes_do_not_depend_on_resolution() -> None:
    for name in NOISE_MASK_NAMES:
        small = pattern_mask(name, 64, 64)
        large = pattern_mask(name, 1024, 1024).reshape(64, 16, 64, 16).mean(axis=(1, 3))
        assert np.abs(small - large).mean() < 0.05, name


def test_the_catalog_has_a_decodable_preview_per_pattern() -> None:
    catalog = pattern_catalog()
    assert [entry["name"] for entry in catalog] == list(NOISE_MASK_NAMES)
    for entry in catalog:
        assert set(entry) == {"name", "description", "preview"}
        preview = Image.open(io.BytesIO(base64.b64decode(entry["preview"])), formats=["PNG"])
        assert (preview.size, preview.mode) == ((64, 64), "L")
        expected = np.round(pattern_mask(entry["name"], 64, 64) * 255)
        assert np.array_equal(np.array(preview), expected)  # white = noise
    small = pattern_catalog(16)[0]["preview"]
    assert Image.open(io.BytesIO(base64.b64decode(small))).size == (16, 16)


def test_an_unknown_name_is_a_422_listing_the_names() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        pattern_mask("triangle", 64, 64)
    error = caught.value
    assert (error.status, error.code) == (422, "unknown_noise_mask")
    assert error.param == "noise_mask.pattern"
    assert "triangle" in error.message and all(name in error.message for name in NOISE_MASK_NAMES)

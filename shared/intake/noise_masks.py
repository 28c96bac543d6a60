"""Named noise-injection masks: where a request asks the engine to inject fresh noise (1) and
where to keep the start image's structure (0), plus the catalog `GET /v1/noise-masks` serves.

Torch-free (numpy + Pillow), so the Router validates names and serves previews without torch.
Shapes are defined in coordinates normalised by the shorter side, centred on the image, so a
pattern looks the same at 64x64 latents and 1024x1024 pixels, and a circle stays round (not an
ellipse) on a non-square image. Gradients are the exception: they span the full width/height.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from shared.api.vocabulary import NOISE_MASK_NAMES
from shared.errors import InvalidRequestError
from shared.imaging import encode_image, to_pil

_EDGE_BAND = 0.125  # border width of `edges`, as a fraction of the shorter side
_CHECKER_CELLS = 8  # checkerboard cells across the shorter side


class NoisePattern(NamedTuple):
    description: str
    function: Callable[[int, int], np.ndarray]


def _centred(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, 0 at the image centre, ±1 at the shorter side's edges."""
    half = min(width, height) / 2
    u = (np.arange(width, dtype=np.float64) + 0.5 - width / 2) / half
    v = (np.arange(height, dtype=np.float64) + 0.5 - height / 2) / half
    return u[None, :], v[:, None]


def _radius(width: int, height: int) -> np.ndarray:
    u, v = _centred(width, height)
    return np.hypot(u, v)


def _circle(width: int, height: int) -> np.ndarray:
    return _radius(width, height) <= 0.5


def _square(width: int, height: int) -> np.ndarray:
    u, v = _centred(width, height)
    return np.maximum(np.abs(u), np.abs(v)) <= 0.5


def _edges(width: int, height: int) -> np.ndarray:
    band = _EDGE_BAND * min(width, height)
    x = np.arange(width) + 0.5
    y = np.arange(height) + 0.5
    from_x = np.minimum(x, width - x)[None, :]
    from_y = np.minimum(y, height - y)[:, None]
    return np.minimum(from_x, from_y) < band


def _ring(width: int, height: int) -> np.ndarray:
    r = _radius(width, height)
    return (r >= 0.35) & (r <= 0.7)


def _diamond(width: int, height: int) -> np.ndarray:
    u, v = _centred(width, height)
    return np.abs(u) + np.abs(v) <= 0.6


def _radial(width: int, height: int) -> np.ndarray:
    # A raised cosine: smooth at the centre and where it reaches 0, so no visible seam.
    r = np.minimum(_radius(width, height), 1.0)
    return 0.5 + 0.5 * np.cos(np.pi * r)


def _gradient(width: int, height: int) -> np.ndarray:
    return np.broadcast_to(np.linspace(0.0, 1.0, width)[None, :], (height, width))


def _vertical_gradient(width: int, height: int) -> np.ndarray:
    return np.broadcast_to(np.linspace(0.0, 1.0, height)[:, None], (height, width))


def _checkerboard(width: int, height: int) -> np.ndarray:
    u, v = _centred(width, height)
    cells = _CHECKER_CELLS / 2  # u runs over [-1, 1] across the shorter side
    return (np.floor(u * cells) + np.floor(v * cells)) % 2 == 0


NOISE_MASK_PATTERNS: dict[str, NoisePattern] = {
    "circle": NoisePattern("A disc at the centre, half the shorter side across.", _circle),
    "square": NoisePattern("A centred square, half the shorter side across.", _square),
    "edges": NoisePattern("A border band, 1/8 of the shorter side wide; centre kept.", _edges),
    "ring": NoisePattern("An annulus around the centre; the middle and corners are kept.", _ring),
    "diamond": NoisePattern("A centred diamond (a square turned 45 degrees).", _diamond),
    "radial": NoisePattern("Soft falloff: full noise at the centre, none at the edges.", _radial),
    "gradient": NoisePattern("Left to right: none at the left edge, full at the right.", _gradient),
    "vertical_gradient": NoisePattern(
        "Top to bottom: none at the top edge, full at the bottom.", _vertical_gradient
    ),
    "checkerboard": NoisePattern("Alternating squares, 8 across the shorter side.", _checkerboard),
}
if tuple(NOISE_MASK_PATTERNS) != NOISE_MASK_NAMES:  # pragma: no cover - a mistake in this file
    raise RuntimeError("NOISE_MASK_PATTERNS must list exactly the NoiseMaskName literals, in order")


def pattern_mask(name: str, width: int, height: int) -> np.ndarray:
    """The named pattern as float32 (height, width) in [0, 1], 1 = inject noise here."""
    pattern = NOISE_MASK_PATTERNS.get(name)
    if pattern is None:
        raise InvalidRequestError(
            f"noise_mask.pattern must be one of {', '.join(NOISE_MASK_NAMES)}; got {name!r}",
            code="unknown_noise_mask",
            param="noise_mask.pattern",
        )
    if width < 1 or height < 1:
        raise ValueError(f"a mask needs a positive size; got {width}x{height}")
    return np.ascontiguousarray(pattern.function(width, height), dtype=np.float32)


def pattern_catalog(preview_size: int = 64) -> list[dict[str, str]]:
    """Every pattern as {"name", "description", "preview"}: a base64 PNG, white = noise."""
    return [
        {
            "name": name,
            "description": pattern.description,
            "preview": encode_image(to_pil(pattern_mask(name, preview_size, preview_size)), "png"),
        }
        for name, pattern in NOISE_MASK_PATTERNS.items()
    ]

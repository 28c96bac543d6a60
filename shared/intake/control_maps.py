"""Control maps: a ControlNet's control image as the engine takes it, uint8 (H, W, 3) at the job's
size, from the RGB pixels the intake decoded and fitted. Torch-free (numpy + OpenCV), so the
Router makes the map at the edge, in its intake's worker thread.

`canny` is diffusers' ControlNet recipe: `cv2.Canny` on the RGB uint8 array, the single-channel
edges stacked to three channels.
"""

from __future__ import annotations

import cv2
import numpy as np

from shared.api.vocabulary import Preprocessor


def control_map(
    pixels: np.ndarray,
    preprocessor: Preprocessor,
    low_threshold: int = 100,
    high_threshold: int = 200,
) -> np.ndarray:
    """The control map of uint8 RGB `pixels` (H, W, 3): `none` gives them as they are, `canny`
    their Canny edges (0 or 255) on all three channels. CPU work: call it off the event loop."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 (H, W, 3); got {pixels.dtype} {pixels.shape}")
    if preprocessor == "none":
        return pixels
    edges = cv2.Canny(pixels, low_threshold, high_threshold)
    return np.repeat(edges[:, :, None], 3, axis=2)

"""Acquisition shifts a deployed chest X-ray model meets, applied to decoded images.

Each shift imitates something that happens in a hospital: a new detector with less contrast, a
noisier low-dose protocol, a soft reconstruction kernel, a downsampled export, a different
exposure, a MONOCHROME1 image read as MONOCHROME2. ``severity`` (0..1] scales each one; the drift
simulator and the detection benchmark send shifted images through the live service.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from cxr_platform.errors import CxrError

SHIFT_NAMES = ("none", "contrast", "noise", "blur", "resolution", "exposure", "invert")

ShiftFunction = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


class UnknownShiftError(CxrError):
    pass


def _contrast(pixels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    mean = float(pixels.mean())
    return mean + (pixels - mean) * (1.0 - 0.6 * severity)


def _noise(pixels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    return pixels + rng.normal(0.0, 0.12 * severity, size=pixels.shape).astype(np.float32)


def _blur(pixels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    # Relative to the image size, so the model input sees the same blur at any resolution.
    sigma = max(0.5, 0.02 * severity * max(pixels.shape))
    # scipy only when a blur is asked for: the CLI lists the shift names without it.
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(pixels, sigma=sigma, mode="nearest")


def _resolution(pixels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    factor = 1.0 + 5.0 * severity
    height, width = pixels.shape
    size = (max(8, round(width / factor)), max(8, round(height / factor)))
    image = Image.fromarray(np.asarray(pixels, dtype=np.float32))
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float32)


def _exposure(pixels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    return pixels * (1.0 + 0.6 * severity) + 0.1 * severity


def _invert(pixels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - pixels


def _none(pixels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    return pixels


SHIFTS: dict[str, ShiftFunction] = {
    "none": _none,
    "contrast": _contrast,
    "noise": _noise,
    "blur": _blur,
    "resolution": _resolution,
    "exposure": _exposure,
    "invert": _invert,
}
assert tuple(SHIFTS) == SHIFT_NAMES


def apply_shift(
    pixels: np.ndarray, shift: str, *, severity: float = 1.0, rng: np.random.Generator
) -> np.ndarray:
    """float [0, 1] (H, W) -> shifted float [0, 1]; ``resolution`` also changes the shape."""
    if shift not in SHIFTS:
        raise UnknownShiftError(f"unknown shift {shift!r}; choose from {', '.join(SHIFT_NAMES)}")
    if not 0.0 < severity <= 1.0:
        raise UnknownShiftError(f"severity must be in (0, 1], not {severity}")
    shifted = SHIFTS[shift](np.asarray(pixels, dtype=np.float32), severity, rng)
    return np.clip(shifted, 0.0, 1.0).astype(np.float32)


def encode_png(pixels: np.ndarray) -> bytes:
    """float [0, 1] (H, W) -> an 8-bit grayscale PNG, the way most exports reach a service."""
    values = np.clip(np.rint(np.asarray(pixels) * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()

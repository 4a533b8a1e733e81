"""Acquisition shifts a deployed chest X-ray model meets, applied to decoded images.

Each shift imitates something that happens in a hospital: a new detector with less contrast, a
noisier low-dose protocol, a soft reconstruction kernel, a downsampled export, a different
exposure, a MONOCHROME1 image read as MONOCHROME2; and two that leave the lungs partly out of
the picture (a crop, collimator shutters). ``severity`` (0..1] scales each one; the drift
simulator and the detection benchmark send shifted images through the live service.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from cxr_platform.errors import CxrError

SHIFT_NAMES = ("none", "contrast", "noise", "blur", "resolution", "exposure", "invert")
# What reaches a reader with the lungs not wholly in the picture: not drift to adapt to, but
# images to flag, so the monitoring loop and its CLI leave them out.
FIELD_SHIFT_NAMES = ("crop", "collimation")

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


def _crop(pixels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Up to 45% of the image cut away on one side (a study exported as a zoomed crop, a
    detector placed too high or to one side): the lungs run off the new border."""
    height, width = pixels.shape
    cut = 0.45 * severity
    side = rng.choice(["top", "bottom", "left", "right"])
    rows, columns = max(1, round(height * cut)), max(1, round(width * cut))
    if side == "top":
        return pixels[rows:]
    if side == "bottom":
        return pixels[: height - rows]
    if side == "left":
        return pixels[:, columns:]
    return pixels[:, : width - columns]


def _collimation(pixels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Collimator shutters closed in from every side, each by 15-30% of the image at full
    severity: the film behind them stays unexposed (white), and part of the lungs with it."""
    height, width = pixels.shape
    top, bottom, left, right = rng.uniform(0.15, 0.30, size=4) * severity
    shuttered = pixels.copy()
    shuttered[: round(height * top)] = 1.0
    shuttered[height - round(height * bottom) :] = 1.0
    shuttered[:, : round(width * left)] = 1.0
    shuttered[:, width - round(width * right) :] = 1.0
    return shuttered


SHIFTS: dict[str, ShiftFunction] = {
    "none": _none,
    "contrast": _contrast,
    "noise": _noise,
    "blur": _blur,
    "resolution": _resolution,
    "exposure": _exposure,
    "invert": _invert,
    "crop": _crop,
    "collimation": _collimation,
}
assert tuple(SHIFTS) == SHIFT_NAMES + FIELD_SHIFT_NAMES


def apply_shift(
    pixels: np.ndarray, shift: str, *, severity: float = 1.0, rng: np.random.Generator
) -> np.ndarray:
    """float [0, 1] (H, W) -> shifted float [0, 1]; ``resolution`` and ``crop`` also change
    the shape."""
    if shift not in SHIFTS:
        raise UnknownShiftError(f"unknown shift {shift!r}; choose from {', '.join(SHIFTS)}")
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

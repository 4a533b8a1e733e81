"""What the decoders return and the pixel scaling they share, importable without pydicom.

Training works on cached arrays and never decodes a file, so the accelerator machine (torch but
no pydicom) can import the training code; :mod:`cxr_platform.data.imaging` is the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

DEFAULT_MAX_PIXELS = 100_000_000

ImageSource = str | Path | bytes | BinaryIO


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """Pixels plus the facts about the original file that profiling and drift monitoring use."""

    pixels: np.ndarray  # float32, shape (H, W), values in [0, 1]
    source_format: str  # "PNG", "JPEG", "DICOM", ...
    width: int
    height: int
    mode: str  # Pillow mode, or the DICOM photometric interpretation
    bit_depth: int
    photometric_interpretation: str | None = None
    transfer_syntax: str | None = None


def luma(rgb: np.ndarray) -> np.ndarray:
    # ITU-R BT.601 weights, the same as Pillow's convert("L"), but without rounding to 8 bits.
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def min_max_scale(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32, copy=False)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)

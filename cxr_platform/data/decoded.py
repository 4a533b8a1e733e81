"""What the decoder returns, importable without the decoder's dependencies (pydicom).

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

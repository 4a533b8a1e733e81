"""The one preprocessing definition: decode -> grayscale [0,1] -> square uint8 -> normalize.

The config is saved with every model version, so training, evaluation, the service and the DICOM
node resize and normalize identically (train/serve skew is ruled out, not tested for).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_platform.data.decoded import DEFAULT_MAX_PIXELS, DecodedImage, ImageSource

# ImageNet's RGB mean/std averaged over channels: a pretrained first convolution folded to one
# channel by summing over RGB expects inputs on this scale.
GRAY_MEAN = 0.449
GRAY_STD = 0.226


@dataclass(frozen=True)
class PreprocessingConfig:
    image_size: int = 224
    # "stretch" resizes to a square without keeping aspect (the Kaggle copy was made that way);
    # "letterbox" pads the shorter side with black first.
    resize_mode: str = "stretch"
    interpolation: str = "bilinear"  # Pillow's bilinear filter, antialiased when shrinking
    mean: float = GRAY_MEAN
    std: float = GRAY_STD
    channels: int = 1
    version: int = 1  # bump when the pixel path changes, so caches and models are rebuilt

    def __post_init__(self) -> None:
        if self.resize_mode not in ("stretch", "letterbox"):
            raise ValueError(
                f"resize_mode must be 'stretch' or 'letterbox', not {self.resize_mode!r}"
            )
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}")
        if self.std <= 0 or self.image_size < 8:
            raise ValueError("std must be positive and image_size at least 8")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessingConfig:
        known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
        return cls(**known)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path


_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def to_square_uint8(pixels: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """float [0,1] (H, W) -> uint8 (size, size)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if config.resize_mode == "letterbox":
        height, width = pixels.shape
        side = max(height, width)
        canvas = np.zeros((side, side), dtype=np.float32)
        top, left = (side - height) // 2, (side - width) // 2
        canvas[top : top + height, left : left + width] = pixels
        pixels = canvas
    size = config.image_size
    if pixels.shape != (size, size):
        resized = Image.fromarray(pixels).resize((size, size), _FILTERS[config.interpolation])
        pixels = np.asarray(resized, dtype=np.float32)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def preprocess(
    source: ImageSource | DecodedImage,
    config: PreprocessingConfig,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Any supported input -> the uint8 square the model's transforms start from."""
    if not isinstance(source, DecodedImage):
        # Imported here: the decoder needs pydicom, which code that only reads the cache (training
        # on the accelerator machine) must not require.
        from cxr_platform.data.imaging import read_image

        # Asking for twice the target keeps JPEG DCT-scaling well above the final resolution.
        source = read_image(source, max_pixels=max_pixels, draft_size=2 * config.image_size)
    return to_square_uint8(source.pixels, config)


def normalize_uint8(images: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """uint8 (..., H, W) -> normalized float32, the exact input the network sees at eval time."""
    return ((images.astype(np.float32) / 255.0) - config.mean) / config.std

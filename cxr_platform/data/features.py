"""The image features drift monitoring compares: computed on the pixels the model sees.

Computing them on the preprocessed uint8 square (not the original) makes them comparable across
image sizes and cheap; the original size, bit depth, format and photometric interpretation are
kept beside them, because a change there is drift too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cxr_platform.data.imaging import DecodedImage

PERCENTILES = (1, 5, 50, 95, 99)


@dataclass(frozen=True)
class ImageFeatures:
    intensity_mean: float
    intensity_std: float
    intensity_p01: float
    intensity_p05: float
    intensity_p50: float
    intensity_p95: float
    intensity_p99: float
    entropy: float  # bits, of the 256-bin histogram
    # Mean absolute Laplacian (0..1 scale): falls with blur and upsampled low-resolution
    # images, rises with noise. None in rows logged before it existed.
    sharpness: float | None = None
    original_width: int | None = None
    original_height: int | None = None
    bit_depth: int | None = None
    source_format: str | None = None
    photometric_interpretation: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


NUMERIC_FEATURES = (
    "intensity_mean",
    "intensity_std",
    "intensity_p01",
    "intensity_p05",
    "intensity_p50",
    "intensity_p95",
    "intensity_p99",
    "entropy",
    "sharpness",
)


def intensity_features(pixels: np.ndarray) -> dict[str, float]:
    """Intensity statistics of one uint8 image, on a 0..1 scale."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError("intensity features are defined on the uint8 model input")
    histogram = np.bincount(pixels.ravel(), minlength=256).astype(np.float64)
    share = histogram / histogram.sum()
    nonzero = share[share > 0]
    # Percentiles from the cumulative histogram: exact for uint8 and O(256), not a sort.
    cumulative = np.cumsum(share)
    percentiles = {
        f"intensity_p{q:02d}": float(np.searchsorted(cumulative, q / 100.0) / 255.0)
        for q in PERCENTILES
    }
    levels = np.arange(256) / 255.0
    mean = float((share * levels).sum())
    return {
        "intensity_mean": mean,
        "intensity_std": float(np.sqrt((share * (levels - mean) ** 2).sum())),
        **percentiles,
        "entropy": float(-(nonzero * np.log2(nonzero)).sum()),
        "sharpness": sharpness(pixels),
    }


def sharpness(pixels: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian of the interior, on a 0..1 intensity scale."""
    values = np.asarray(pixels, dtype=np.float32)
    if min(values.shape) < 3:
        return 0.0
    laplacian = (
        4.0 * values[1:-1, 1:-1]
        - values[:-2, 1:-1]
        - values[2:, 1:-1]
        - values[1:-1, :-2]
        - values[1:-1, 2:]
    )
    return float(np.abs(laplacian).mean() / 255.0)


def image_features(pixels: np.ndarray, decoded: DecodedImage | None = None) -> ImageFeatures:
    values = intensity_features(pixels)
    if decoded is None:
        return ImageFeatures(**values)
    return ImageFeatures(
        **values,
        original_width=decoded.width,
        original_height=decoded.height,
        bit_depth=decoded.bit_depth,
        source_format=decoded.source_format,
        photometric_interpretation=decoded.photometric_interpretation,
    )

"""Reference data for drift monitoring, made at export and stored with the model version.

One row per validation image: the same image features the service logs (computed on the same
uint8 model input), the original size, and the exported model's calibrated probability; and one
row per training image with the features only. Input drift compares against both: images come
several per patient, so a validation split alone (a few dozen patients in the demo) is too
small a picture of the input distribution and raises false alarms. Prediction and performance
drift use the validation rows only: probabilities on training images are overfit. The file
travels inside the registry version, so any version can be monitored without its training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.imaging import read_image
from cxr_platform.inference.features import NUMERIC_FEATURES, intensity_features
from cxr_platform.inference.predictor import Predictor

REFERENCE_FILE = "reference.csv"
SIZE_FEATURES = ("original_width", "original_height")
# What input drift compares: intensity on the model input plus the acquisition size.
INPUT_FEATURES = (*NUMERIC_FEATURES, *SIZE_FEATURES)
PROBABILITY = "probability"
PREDICTED = "predicted"  # the label at the version's operating threshold
SPLIT = "split"


def original_size(path: str | Path) -> tuple[int | None, int | None]:
    """Width and height from the file header where Pillow reads it, else by decoding."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001 - DICOM and anything Pillow cannot open
        try:
            decoded = read_image(path)
        except Exception:  # noqa: BLE001 - an unreadable file has no size; drift skips the NaN
            return None, None
        return decoded.width, decoded.height


# Six significant digits: features and probabilities need no more, and drift compares the
# logged values rounded the same way (monitoring.drift).
REFERENCE_FLOAT_FORMAT = "%.6g"


def reference_frame(
    images: np.ndarray,
    probabilities: np.ndarray | None,
    labels: np.ndarray,
    threshold: float,
    sizes: Sequence[tuple[int | None, int | None]] | None = None,
    *,
    split: str = "val",
) -> pd.DataFrame:
    """``probabilities`` None: feature rows only (the training split)."""
    images = np.asarray(images)
    if probabilities is None:
        probabilities = np.full(len(images), np.nan)
    if not len(images) == len(probabilities) == len(labels):
        raise ValueError("images, probabilities and labels must have the same length")
    rows = [intensity_features(image) for image in images]
    frame = pd.DataFrame(rows, columns=list(NUMERIC_FEATURES))
    widths, heights = zip(*sizes, strict=True) if sizes else ([None] * len(images),) * 2
    frame["original_width"] = pd.array(widths, dtype="Float64").astype(float)
    frame["original_height"] = pd.array(heights, dtype="Float64").astype(float)
    frame[PROBABILITY] = np.asarray(probabilities, dtype=np.float64)
    scored = frame[PROBABILITY].notna()
    frame[PREDICTED] = np.where(
        scored, np.where(frame[PROBABILITY] >= threshold, "PNEUMONIA", "NORMAL"), None
    )
    frame["label"] = np.where(np.asarray(labels) >= 0.5, "PNEUMONIA", "NORMAL")
    frame[SPLIT] = split
    return frame


def reference_from_cache(cache: PreprocessedCache, predictor: Predictor) -> pd.DataFrame:
    """Validation rows scored by ``predictor``, training rows with features only."""
    frames = []
    for split in ("val", "train"):
        images = cache.images(split, mmap=False)
        probabilities = None
        if split == "val":
            probabilities = predictor.probabilities_in_batches(images)
        sizes = [original_size(path) for path in cache.index(split)["path"]]
        labels = cache.labels(split)
        frames.append(
            reference_frame(images, probabilities, labels, predictor.threshold, sizes, split=split)
        )
    return pd.concat(frames, ignore_index=True)


def write_reference(folder: Path, frame: pd.DataFrame) -> Path:
    path = Path(folder) / REFERENCE_FILE
    frame.to_csv(path, index=False, float_format=REFERENCE_FLOAT_FORMAT)
    return path


def load_reference(folder: Path) -> pd.DataFrame | None:
    """None for a version exported before drift monitoring existed."""
    path = Path(folder) / REFERENCE_FILE
    return pd.read_csv(path) if path.exists() else None

"""Reference data for drift monitoring, made at export and stored with the model version.

One row per validation image: the same image features the service logs (computed on the same
uint8 model input), how it was acquired (original size, bit depth, file format, photometric
interpretation), the exported model's calibrated probability and its raw logit (a probability
stored to six digits rounds a confident call to 1 and loses it), and a case number per patient
(a site's recalibration counts the validation positives by patient); and one row per training
image with the features only. Input drift compares against both: images come
several per patient, so a validation split alone (a few dozen patients in the demo) is too
small a picture of the input distribution and raises false alarms. Prediction and performance
drift use the validation rows only: probabilities on training images are overfit. The file
travels inside the registry version, so any version can be monitored without its training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.features import NUMERIC_FEATURES, intensity_features
from cxr_platform.data.imaging import bit_depth_of_mode, read_image
from cxr_platform.model_version.predictor import Predictor

REFERENCE_FILE = "reference.csv"
# What input drift compares. Content: intensity statistics on the model input, comparable
# whatever the image came as. Acquisition: what the detector and the export decided, comparable
# only between images that came the same way (see ``acquisition_source``).
CONTENT_FEATURES = NUMERIC_FEATURES
ACQUISITION_FEATURES = ("original_width", "original_height", "bit_depth")
ACQUISITION_CATEGORIES = ("photometric_interpretation",)
SOURCE_FORMAT = "source_format"
PROBABILITY = "probability"
LOGIT = "logit"  # the network's raw output, before the version's calibration
# Which patient an image is of, as a number that means nothing outside the file (0, 1, ... in
# order of appearance): its images are not independent, and that is all the file needs to say.
CASE = "case"
PREDICTED = "predicted"  # the label at the version's operating threshold
SPLIT = "split"


class Acquisition(NamedTuple):
    width: int | None
    height: int | None
    bit_depth: int | None = None
    source_format: str | None = None
    photometric_interpretation: str | None = None


UNKNOWN_ACQUISITION = Acquisition(None, None)


def acquisition_source(source_format: object) -> str:
    """Which images can be compared on acquisition features. A DICOM instance carries the
    detector's matrix and stored bit depth; an image file (PNG, JPEG, ...) was exported,
    usually resized and windowed to 8 bits. Comparing one with the other measures the export,
    not the patients, so each is compared only with its own kind. A reference made before the
    format was recorded came from the training files, which the platform reads as image files
    unless they were DICOM; it counts as image files."""
    return "dicom" if str(source_format).upper() == "DICOM" else "image"


def acquisition_of(path: str | Path) -> Acquisition:
    """From the file header where Pillow reads it, else by decoding."""
    try:
        with Image.open(path) as image:
            return Acquisition(*image.size, bit_depth_of_mode(image.mode), image.format)
    except Exception:  # noqa: BLE001 - DICOM and anything Pillow cannot open
        try:
            decoded = read_image(path)
        except Exception:  # noqa: BLE001 - an unreadable file has no size; drift skips the NaN
            return UNKNOWN_ACQUISITION
        return Acquisition(
            decoded.width,
            decoded.height,
            decoded.bit_depth,
            decoded.source_format,
            decoded.photometric_interpretation,
        )


# Six significant digits: features and probabilities need no more, and drift compares the
# logged values rounded the same way (monitoring.drift).
REFERENCE_FLOAT_FORMAT = "%.6g"


def reference_frame(
    images: np.ndarray,
    probabilities: np.ndarray | None,
    labels: np.ndarray,
    threshold: float,
    acquisitions: Sequence[Acquisition] | None = None,
    *,
    split: str = "val",
    logits: np.ndarray | None = None,
    patients: Sequence[str] | None = None,
) -> pd.DataFrame:
    """``probabilities`` None: feature rows only (the training split). ``logits``, where given,
    are the raw outputs the probabilities were calibrated from; ``patients``, each image's
    patient, kept as a case number only."""
    images = np.asarray(images)
    if probabilities is None:
        probabilities = np.full(len(images), np.nan)
    if not len(images) == len(probabilities) == len(labels):
        raise ValueError("images, probabilities and labels must have the same length")
    rows = [intensity_features(image) for image in images]
    frame = pd.DataFrame(rows, columns=list(NUMERIC_FEATURES))
    acquired = pd.DataFrame(
        list(acquisitions) if acquisitions else [UNKNOWN_ACQUISITION] * len(images),
        columns=list(Acquisition._fields),
    )
    if len(acquired) != len(images):
        raise ValueError("images and acquisitions must have the same length")
    frame["original_width"] = pd.to_numeric(acquired["width"]).astype(float)
    frame["original_height"] = pd.to_numeric(acquired["height"]).astype(float)
    frame["bit_depth"] = pd.to_numeric(acquired["bit_depth"]).astype(float)
    frame[SOURCE_FORMAT] = acquired["source_format"].to_numpy(dtype=object)
    frame["photometric_interpretation"] = acquired["photometric_interpretation"].to_numpy(
        dtype=object
    )
    frame[PROBABILITY] = np.asarray(probabilities, dtype=np.float64)
    if logits is not None:
        if len(logits) != len(images):
            raise ValueError("images and logits must have the same length")
        frame[LOGIT] = np.asarray(logits, dtype=np.float64)
    if patients is not None:
        if len(patients) != len(images):
            raise ValueError("images and patients must have the same length")
        frame[CASE] = pd.factorize(pd.Series(list(patients), dtype=str))[0]
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
        logits = probabilities = None
        if split == "val":
            logits = predictor.logits_in_batches(images)
            probabilities = predictor.calibration.probabilities(logits)
        index = cache.index(split)
        acquisitions = [acquisition_of(path) for path in index["path"]]
        labels = cache.labels(split)
        frames.append(
            reference_frame(
                images,
                probabilities,
                labels,
                predictor.threshold,
                acquisitions,
                split=split,
                logits=logits,
                patients=index["patient_id"].astype(str).tolist() if split == "val" else None,
            )
        )
    return pd.concat(frames, ignore_index=True)


def write_reference(folder: Path, frame: pd.DataFrame) -> Path:
    path = Path(folder) / REFERENCE_FILE
    if LOGIT in frame:
        # Nine digits hold a float32 logit exactly: a calibration with a small temperature
        # multiplies whatever six digits would lose.
        frame = frame.assign(
            **{LOGIT: frame[LOGIT].map(lambda value: "" if pd.isna(value) else f"{value:.9g}")}
        )
    frame.to_csv(path, index=False, float_format=REFERENCE_FLOAT_FORMAT)
    return path


def load_reference(folder: Path) -> pd.DataFrame | None:
    """None for a version exported before drift monitoring existed."""
    path = Path(folder) / REFERENCE_FILE
    return pd.read_csv(path) if path.exists() else None

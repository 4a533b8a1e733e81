"""The population check: does an image look like the patients the model was made for, judged by
the network's own view of it when no header says the patient's age?

A chest radiograph of an adult is a chest radiograph (the input gate lets it through), but not
one a model trained on small children was made or validated for. The features are what
:class:`~cxr_platform.models.zoo.WithFeatures` adds to the exported graph: each channel's mean
and spread at the end of every stage of the network. A linear score on them, standardised by the
training split, is fitted at export against example images of patients the version is *not*
for (``CXR_OUT_OF_POPULATION_DIR``; for a paediatric model, adults' chest radiographs); its
threshold is the validation split's 99.5th percentile (on a small split, no lower than a normal
fit's 99.9th), and no lower than the same percentile of an acquisition-shifted copy of the split,
so about one in two hundred of the model's own population is refused, on its own detectors or
on noisier ones. How many of the other population it refuses is estimated at export two ways
and travels with the version: cross-validated with a patient's images held out together, and,
given several collections of such images, with each whole collection left out in turn (what to
expect of patients from elsewhere).

Measured on the real data (``benchmarks/population_check.py``): a distance from the training
features alone (a PCA, no examples of the other population) refused none of the 55 adults,
because adults' features lie inside the children's spread; the direction that separates the
two is what a fitted score finds. Without examples of the other population a version has no
check by pixels, and its card says so.

Numpy only: applying the check is one dot product.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from cxr_platform.errors import CxrError
from cxr_platform.model_version.arrays import decode_floats, encode_floats

CHECK_FORMAT = 2
# The threshold: this quantile of the validation split's scores. A split of fewer than
# SMALL_SPLIT images (two beyond the quantile) has no tail to read it from, and its largest score
# alone would refuse several percent of the model's own population (the demo's and the tests'
# splits): there the threshold is no lower than a normal fit's TAIL_QUANTILE. On the real data
# that floor would have given away 16 of every 100 adults for kids' refusals it did not need to
# save (benchmarks/RESULTS.md).
VALIDATION_QUANTILE = 0.995
TAIL_QUANTILE = 0.999
SMALL_SPLIT = 400


class PopulationCheckError(CxrError):
    """A population check could not be fitted or read."""


def standardisation(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the training split's features. Channels a ReLU leaves at zero for every
    training image have no spread: a floor keeps them finite."""
    train = np.asarray(train, dtype=np.float64)
    scale = np.maximum(train.std(axis=0), 1e-3 * max(float(train.std()), 1e-6))
    return train.mean(axis=0).astype(np.float32), scale.astype(np.float32)


@dataclass(frozen=True, eq=False)
class PopulationCheck:
    mean: np.ndarray  # (D,) of the training split's features
    scale: np.ndarray  # (D,)
    weights: np.ndarray  # (D,) on the standardised features
    bias: float
    threshold: float  # on the score; above it, refused
    fitted_on: dict[str, Any] = field(default_factory=dict)

    @property
    def dimensions(self) -> int:
        return int(self.mean.size)

    def standardised(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.dimensions:
            raise PopulationCheckError(
                f"expected features of shape (N, {self.dimensions}), got {features.shape}"
            )
        return (features - self.mean) / self.scale

    def scores(self, features: np.ndarray) -> np.ndarray:
        """How much more each image looks like the other population than like the training
        images (log-odds, with both classes weighted alike)."""
        return (self.standardised(features) @ self.weights + self.bias).astype(np.float64)

    def refused(self, features: np.ndarray) -> np.ndarray:
        return self.scores(features) > self.threshold

    def summary(self) -> dict[str, Any]:
        return {
            "method": "linear score on the network's per-stage channel statistics",
            "dimensions": self.dimensions,
            "threshold": self.threshold,
            **self.fitted_on,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECK_FORMAT,
            "dimensions": self.dimensions,
            "mean": encode_floats(self.mean),
            "scale": encode_floats(self.scale),
            "weights": encode_floats(self.weights),
            "bias": float(self.bias),
            "threshold": float(self.threshold),
            "fitted_on": dict(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PopulationCheck:
        found = values.get("format")
        if found != CHECK_FORMAT:
            raise PopulationCheckError(f"unsupported population check format {found!r}")
        try:
            dims = int(values["dimensions"])
            return cls(
                mean=decode_floats(values["mean"], (dims,)),
                scale=decode_floats(values["scale"], (dims,)),
                weights=decode_floats(values["weights"], (dims,)),
                bias=float(values["bias"]),
                threshold=float(values["threshold"]),
                fitted_on=dict(values.get("fitted_on", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PopulationCheckError(f"unreadable population check: {error!r}") from error


def validation_threshold(scores: np.ndarray) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    empirical = float(np.quantile(scores, VALIDATION_QUANTILE))
    if len(scores) >= SMALL_SPLIT:
        return empirical
    spread = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    return max(empirical, float(scores.mean()) + NormalDist().inv_cdf(TAIL_QUANTILE) * spread)


def thresholded(
    mean: np.ndarray,
    scale: np.ndarray,
    weights: np.ndarray,
    bias: float,
    val: np.ndarray,
    *,
    shifted_val: np.ndarray | None = None,
) -> PopulationCheck:
    """A fitted score with its threshold set on the validation split's features, and where
    ``shifted_val`` is given (the split under acquisition shifts) no lower than that copy's own
    threshold: a noisier or flatter detector's children are the model's population too."""
    provisional = PopulationCheck(mean, scale, np.asarray(weights, np.float32), bias, np.inf)
    val_scores = provisional.scores(val)
    threshold = validation_threshold(val_scores)
    fitted_on: dict[str, Any] = {"n_val": int(len(val))}
    if shifted_val is not None and len(shifted_val):
        shifted_scores = provisional.scores(shifted_val)
        threshold = max(threshold, validation_threshold(shifted_scores))
        fitted_on["n_shifted_val"] = int(len(shifted_val))
        fitted_on["shifted_val_refused"] = int((shifted_scores > threshold).sum())
    fitted_on["val_refused"] = int((val_scores > threshold).sum())
    return PopulationCheck(
        provisional.mean,
        provisional.scale,
        provisional.weights,
        float(bias),
        threshold,
        fitted_on=fitted_on,
    )

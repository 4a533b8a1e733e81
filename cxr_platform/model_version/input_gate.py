"""The input gate: decide from the pixels whether an image is a frontal chest radiograph the
model can judge, before any diagnosis leaves the platform.

Two stages, both cheap next to the classifier:

1. **Degenerate images**, from the decoded original: too small, an extreme aspect ratio,
   near-constant, or mostly one value (padding, a blank page).
2. **Distance to the training images**: each model input is shrunk to a 32x32 thumbnail and
   standardised (its own mean and spread, so contrast, exposure and gamma changes, which are
   drift to adapt to, do not count). A probabilistic PCA fitted on the training split scores how
   far the thumbnail lies from them: the Mahalanobis distance inside a 12-dimensional subspace
   plus the residual outside it, per pixel (about 1 for a training image). Photographs,
   documents, CT/MR/ultrasound renderings, other views and crops lie far away; an inverted image
   does too, because standardisation keeps the sign and the mean chest pattern has a strong
   one. An upside-down radiograph can still lie near; it is refused when turning it over brings
   it nearer.

The threshold is fitted on the validation split (its 99.5th percentile with a margin, and no lower
than a log-normal tail fit allows) and travels inside the exported model's metadata with the
operating point. Numpy and Pillow only.
Measurements: ``benchmarks/input_gate.py`` and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
from PIL import Image

from cxr_platform.errors import CxrError
from cxr_platform.model_version.arrays import decode_floats, encode_floats

GATE_FORMAT = 1
THUMBNAIL_SIDE = 32
DEFAULT_COMPONENTS = 12
# The validation quantile the threshold starts from, and the margin above it: the margin keeps
# acquisition-shifted radiographs (benchmarks/input_gate.py) inside.
VALIDATION_QUANTILE = 0.995
THRESHOLD_MARGIN = 1.15
# A small validation split has no tail to read a 99.5th percentile from (the demo's 48 images
# put it at their maximum, and 4.8% of fresh synthetic patients fell above it): the threshold is
# at least the 99.9th percentile of a log-normal fitted to the validation scores.
TAIL_QUANTILE = 0.999

# Reasons, as the edges report them ("not_a_chest_radiograph: <reason>").
TOO_SMALL = "too_small"
EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
NEAR_CONSTANT = "near_constant"
MOSTLY_UNIFORM = "mostly_uniform"
UPSIDE_DOWN = "upside_down"
UNLIKE_TRAINING = "unlike_a_frontal_chest_radiograph"
REASONS = (TOO_SMALL, EXTREME_ASPECT_RATIO, NEAR_CONSTANT, MOSTLY_UNIFORM, UPSIDE_DOWN)
REASONS += (UNLIKE_TRAINING,)


class InputGateError(CxrError):
    """A gate could not be fitted or read."""


@dataclass(frozen=True)
class DegenerateLimits:
    # Pixels of the original. Radiographs are hundreds to thousands; 48 still lets a 288-pixel
    # image downsampled six times (the strongest resolution shift) through.
    min_side: int = 48
    max_aspect_ratio: float = 2.5  # long side / short side; chest films are at most ~1.3
    min_std: float = 0.02  # of the [0, 1] pixels: a blank or saturated image
    max_uniform_fraction: float = 0.6  # share of pixels within 1/255 of the most common value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateVerdict:
    accepted: bool
    reason: str | None = None  # one of REASONS when refused
    detail: str = ""
    score: float | None = None  # the distance score, when it was computed
    threshold: float | None = None

    def describe(self) -> str:
        return f"{self.reason}: {self.detail}" if self.reason else "accepted"


ACCEPTED_WITHOUT_GATE = GateVerdict(True, detail="this model version has no input gate")


def shrunk(squares: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(N, S, S) uint8 model inputs -> (N, 32, 32) uint8, each the box-filtered image."""
    out = np.empty((len(squares), THUMBNAIL_SIDE, THUMBNAIL_SIDE), np.uint8)
    for index, square in enumerate(squares):
        out[index] = np.asarray(
            Image.fromarray(np.asarray(square, dtype=np.uint8)).resize(
                (THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX
            )
        )
    return out


def standardised(small: np.ndarray) -> np.ndarray:
    """(N, 32, 32) shrunk images -> (N, 32*32) float32, each to mean 0 and spread 1."""
    values = small.reshape(len(small), -1).astype(np.float32)
    return (values - values.mean(axis=1, keepdims=True)) / (
        values.std(axis=1, keepdims=True) + 1e-3
    )


def thumbnails(squares: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(N, S, S) uint8 model inputs -> (N, 32*32) standardised float32 thumbnails."""
    return standardised(shrunk(squares))


def degenerate_verdict(pixels: np.ndarray, limits: DegenerateLimits) -> GateVerdict | None:
    """The refusal for a degenerate original (float pixels in [0, 1]), or None."""
    height, width = pixels.shape[:2]
    if min(height, width) < limits.min_side:
        return GateVerdict(
            False, TOO_SMALL, f"{width}x{height} pixels; at least {limits.min_side} a side"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > limits.max_aspect_ratio:
        return GateVerdict(
            False,
            EXTREME_ASPECT_RATIO,
            f"aspect ratio {ratio:.1f}; at most {limits.max_aspect_ratio:g}",
        )
    std = float(pixels.std())
    if std < limits.min_std:
        return GateVerdict(
            False, NEAR_CONSTANT, f"pixel spread {std:.3f}; at least {limits.min_std}"
        )
    levels = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    counts = np.bincount(levels.ravel(), minlength=256)
    peak = int(counts.argmax())
    near_peak = counts[max(0, peak - 1) : peak + 2].sum() / levels.size
    if near_peak > limits.max_uniform_fraction:
        return GateVerdict(
            False,
            MOSTLY_UNIFORM,
            f"{near_peak:.0%} of the image is one value (padding or blank); at most "
            f"{limits.max_uniform_fraction:.0%}",
        )
    return None


@dataclass(frozen=True, eq=False)
class InputGate:
    mean: np.ndarray  # (D,) mean training thumbnail
    components: np.ndarray  # (K, D) principal axes
    variances: np.ndarray  # (K,) variance along each axis
    residual_variance: float  # per dimension, outside the subspace
    threshold: float
    limits: DegenerateLimits = field(default_factory=DegenerateLimits)
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def scores(self, squares: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Distance of each model input from the training images (about 1 for one of them)."""
        return self._distances(thumbnails(squares))

    def _distances(self, thumbs: np.ndarray) -> np.ndarray:
        centred = thumbs - self.mean
        coefficients = centred @ self.components.T
        residual = centred - coefficients @ self.components
        inside = (coefficients**2 / self.variances).sum(axis=1)
        outside = (residual**2).sum(axis=1) / self.residual_variance
        return ((inside + outside) / self.mean.size).astype(np.float64)

    def judge(self, original: np.ndarray, square: np.ndarray) -> GateVerdict:
        """``original``: the decoded image (float [0, 1]); ``square``: the model input."""
        return self.judge_many([original], np.asarray(square)[None])[0]

    def judge_many(self, originals: Sequence[np.ndarray], squares: np.ndarray) -> list[GateVerdict]:
        verdicts: list[GateVerdict | None] = [
            degenerate_verdict(original, self.limits) for original in originals
        ]
        pending = [i for i, verdict in enumerate(verdicts) if verdict is None]
        if pending:
            chosen = np.asarray(squares)[pending]
            # The two ways a film is commonly mounted wrong that keep it a plausible image. Where
            # the 32x32 boxes tile the input exactly, the turned image's thumbnail is the turned
            # thumbnail (the same pixels in each box), at a third of the cost.
            small = shrunk(chosen)
            if chosen.shape[1] % THUMBNAIL_SIDE == 0 and chosen.shape[2] % THUMBNAIL_SIDE == 0:
                flipped, rotated = small[:, ::-1, :], np.rot90(small, 2, axes=(1, 2))
            else:
                flipped = shrunk(chosen[:, ::-1, :])
                rotated = shrunk(np.rot90(chosen, 2, axes=(1, 2)))
            upright = self._distances(standardised(small))
            turned = np.minimum(
                self._distances(standardised(flipped)), self._distances(standardised(rotated))
            )
            for index, score, turned_score in zip(pending, upright, turned, strict=True):
                verdicts[index] = self._distance_verdict(float(score), float(turned_score))
        return [verdict for verdict in verdicts if verdict is not None]

    def _distance_verdict(self, score: float, turned_score: float) -> GateVerdict:
        if score > self.threshold:
            return GateVerdict(
                False,
                UNLIKE_TRAINING,
                f"distance {score:.2f} from the training radiographs; at most {self.threshold:.2f}",
                score,
                self.threshold,
            )
        if turned_score < score:
            return GateVerdict(
                False,
                UPSIDE_DOWN,
                f"turned over it lies nearer the training radiographs ({turned_score:.2f} < "
                f"{score:.2f}): mounted upside down?",
                score,
                self.threshold,
            )
        return GateVerdict(True, None, "", score, self.threshold)

    def summary(self) -> dict[str, Any]:
        """What a person reading the model card or the registry needs (no arrays)."""
        return {
            "method": "ppca-thumbnail",
            "components": int(len(self.components)),
            "threshold": self.threshold,
            "limits": self.limits.to_dict(),
            **self.fitted_on,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": GATE_FORMAT,
            "thumbnail_side": THUMBNAIL_SIDE,
            "mean": encode_floats(self.mean),
            "components": encode_floats(self.components),
            "n_components": int(len(self.components)),
            "variances": [float(v) for v in self.variances],
            "residual_variance": float(self.residual_variance),
            "threshold": float(self.threshold),
            "limits": self.limits.to_dict(),
            "fitted_on": dict(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InputGate:
        if values.get("format") != GATE_FORMAT or values.get("thumbnail_side") != THUMBNAIL_SIDE:
            raise InputGateError(f"unsupported input gate format (expected {GATE_FORMAT})")
        try:
            dims = THUMBNAIL_SIDE * THUMBNAIL_SIDE
            k = int(values["n_components"])
            return cls(
                mean=decode_floats(values["mean"], (dims,)),
                components=decode_floats(values["components"], (k, dims)),
                variances=np.asarray(values["variances"], dtype=np.float32),
                residual_variance=float(values["residual_variance"]),
                threshold=float(values["threshold"]),
                limits=DegenerateLimits(**values.get("limits", {})),
                fitted_on=dict(values.get("fitted_on", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InputGateError(f"unreadable input gate: {error!r}") from error


def _log_normal_quantile(scores: np.ndarray, quantile: float) -> float:
    logs = np.log(np.maximum(scores, 1e-9))
    spread = float(logs.std(ddof=1)) if len(logs) > 1 else 0.0
    return float(np.exp(logs.mean() + NormalDist().inv_cdf(quantile) * spread))


def fit_input_gate(
    train: np.ndarray,
    val: np.ndarray,
    *,
    n_components: int = DEFAULT_COMPONENTS,
    limits: DegenerateLimits = DegenerateLimits(),
) -> InputGate:
    """Fit on the training split's model inputs, set the threshold on validation's."""
    if len(train) <= n_components + 1 or len(val) == 0:
        raise InputGateError(
            f"fitting an input gate needs more than {n_components + 1} training images and some "
            f"validation images (got {len(train)} and {len(val)})"
        )
    data = thumbnails(train)
    mean = data.mean(axis=0)
    _, singular, axes = np.linalg.svd(data - mean, full_matrices=False)
    components = axes[:n_components]
    variances = np.maximum(singular[:n_components] ** 2 / (len(data) - 1), 1e-6)
    residual = (data - mean) - (data - mean) @ components.T @ components
    residual_variance = max(
        float((residual**2).sum() / (len(data) * (data.shape[1] - n_components))), 1e-6
    )
    provisional = InputGate(mean, components, variances, residual_variance, np.inf, limits)
    val_scores = provisional.scores(val)
    empirical = float(np.quantile(val_scores, VALIDATION_QUANTILE) * THRESHOLD_MARGIN)
    threshold = max(empirical, _log_normal_quantile(val_scores, TAIL_QUANTILE))
    gate = InputGate(
        mean.astype(np.float32),
        components.astype(np.float32),
        variances.astype(np.float32),
        residual_variance,
        threshold,
        limits,
    )
    val_refused = 0
    # The cache keeps model inputs only, so they stand in for the originals here (the
    # degenerate checks see a square of the model's size); a chunk at a time bounds the copies.
    for start in range(0, len(val), 256):
        chunk = val[start : start + 256]
        originals = [square.astype(np.float32) / 255.0 for square in chunk]
        val_refused += sum(not v.accepted for v in gate.judge_many(originals, chunk))
    return InputGate(
        gate.mean,
        gate.components,
        gate.variances,
        gate.residual_variance,
        threshold,
        limits,
        fitted_on={
            "n_train": int(len(train)),
            "n_val": int(len(val)),
            "val_refused": int(val_refused),
            "val_refusal_rate": val_refused / len(val),
        },
    )

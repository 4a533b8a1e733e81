"""Refitting a version's operating point on a site's labels: Platt scaling, and a threshold whose
sensitivity target holds at the lower end of its interval.

At a new site a model's ranking often holds while its threshold does not: the same threshold
calls many more normal images pneumonia. The weights stay; what a site can change is the
operating point (Platt calibration and the threshold), and only with evidence:

- :func:`recalibrate` refits Platt scaling on a site's labeled requests and picks the threshold
  so that the sensitivity target holds **at the lower end of its 95% interval**, not at the point
  estimate: a threshold fitted to the point estimate on a hundred labels undershoots the target
  on the rest of the site's images about half the time. The price, in specificity, is reported.

The label-free counterpart, a site's prevalence from its unlabeled traffic, is
:mod:`cxr_platform.calibration.prevalence`.

The inference log keeps calibrated probabilities, not logits; a probability and the version's
own Platt parameters give the logit back, so nothing else needs storing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import logit as log_odds
from scipy.stats import beta

from cxr_platform.errors import CxrError
from cxr_platform.model_version.operating_point import OperatingPoint, calibrated_probabilities
from cxr_platform.models.evaluation import fit_platt, threshold_metrics

CONFIDENCE = 0.95
EDGE = 1e-12  # probabilities are clipped this far from 0 and 1 before taking log-odds


class RecalibrationError(CxrError):
    pass


class NotEnoughLabelsError(RecalibrationError):
    """Too few labels of a class to move the operating point with confidence."""

    def __init__(self, message: str, missing: dict[str, int]) -> None:
        super().__init__(message)
        self.missing = missing  # per class, how many more labels are needed


def logits_from_probabilities(
    probabilities: np.ndarray, operating_point: OperatingPoint
) -> np.ndarray:
    """Invert ``p = sigmoid(logit / T + b)``: the logits the version computed."""
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), EDGE, 1 - EDGE)
    return (log_odds(clipped) - operating_point.bias) * operating_point.temperature


def sensitivity_lower_bound(
    detected: int, positives: int, *, groups: int | None = None, confidence: float = CONFIDENCE
) -> float:
    """One-sided Clopper-Pearson lower bound of a sensitivity.

    With ``groups`` (positive studies, fewer than positive images), the counts are scaled to
    that many independent trials: images of one study tend to be called together, so they are
    worth less than as many independent cases. Conservative when they are.
    """
    if positives <= 0:
        return 0.0
    trials = positives if groups is None else max(1, min(groups, positives))
    successes = detected * trials / positives
    if successes <= 0:
        return 0.0
    return float(beta.ppf(1 - confidence, successes, trials - successes + 1))


def minimum_positives(target_sensitivity: float, confidence: float = CONFIDENCE) -> int:
    """Fewest positives with which even a perfect sensitivity certifies ``target`` at its
    lower bound: ``target ** n <= 1 - confidence`` (59 for 0.95 at 95%)."""
    return math.ceil(math.log(1 - confidence) / math.log(target_sensitivity))


@dataclass(frozen=True)
class Recalibration:
    """A site's new operating point, and what it was based on and costs."""

    operating_point: OperatingPoint
    n_positive: int
    n_negative: int
    n_positive_groups: int
    prevalence: float  # of the labels used
    sensitivity: float  # on the labels used, at the new threshold
    sensitivity_lower_bound: float
    specificity: float
    # What a threshold fitted to the point estimate would have given: the confidence's price.
    point_estimate_threshold: float
    point_estimate_specificity: float

    @property
    def specificity_cost(self) -> float:
        return self.point_estimate_specificity - self.specificity

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["operating_point"] = self.operating_point.to_dict()
        values["specificity_cost"] = self.specificity_cost
        return values


def _group_count(groups: np.ndarray | None, members: np.ndarray) -> int:
    if groups is None:
        return int(members.sum())
    return len(set(np.asarray(groups, dtype=str)[members]))


def recalibrate(
    labels: np.ndarray,
    logits: np.ndarray,
    *,
    target_sensitivity: float,
    groups: np.ndarray | None = None,
    min_negatives: int = 30,
    confidence: float = CONFIDENCE,
) -> Recalibration:
    """Platt scaling refitted on the site's labels, and the highest threshold whose
    sensitivity's lower bound reaches ``target_sensitivity``.

    ``groups``: each label's study (images of one study are not independent). Raises
    :class:`NotEnoughLabelsError`, saying how many more of each class are needed, when the
    target cannot be certified or the negatives are too few to say what it costs.
    """
    labels = np.asarray(labels).astype(int).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    positives, negatives = labels == 1, labels == 0
    n_positive, n_negative = int(positives.sum()), int(negatives.sum())
    positive_groups = _group_count(groups, positives)
    needed = minimum_positives(target_sensitivity, confidence)
    missing = {
        "PNEUMONIA": max(0, needed - positive_groups),
        "NORMAL": max(0, min_negatives - n_negative),
    }
    if any(missing.values()):
        wanted = ", ".join(f"{count} more {name}" for name, count in missing.items() if count)
        raise NotEnoughLabelsError(
            f"{n_positive} PNEUMONIA labels ({positive_groups} studies) and {n_negative} NORMAL "
            f"labels: certifying sensitivity >= {target_sensitivity:g} at {confidence:.0%} "
            f"needs {needed} positive studies, and judging specificity {min_negatives} "
            f"negatives; {wanted} needed",
            missing,
        )
    temperature, bias = fit_platt(logits, labels)
    probabilities = calibrated_probabilities(logits, temperature, bias)
    # Thresholds from the highest score down: sensitivity only grows, specificity only falls,
    # so the first that certifies the target is the best one that does.
    candidates = np.unique(probabilities[positives])[::-1]
    chosen = point = None
    for threshold in candidates:
        called = probabilities >= threshold
        detected = int(called[positives].sum())
        if point is None and detected / n_positive >= target_sensitivity - 1e-12:
            point = float(threshold)
        lower = sensitivity_lower_bound(
            detected,
            n_positive,
            groups=positive_groups if groups is not None else None,
            confidence=confidence,
        )
        if lower >= target_sensitivity:
            chosen = float(threshold)
            break
    if chosen is None or point is None:  # the lowest threshold detects every positive
        chosen = point = float(candidates[-1])
    at_chosen = threshold_metrics(labels, probabilities, chosen)
    at_point = threshold_metrics(labels, probabilities, point)
    detected = int((probabilities[positives] >= chosen).sum())
    operating_point = OperatingPoint(
        threshold=chosen,
        temperature=temperature,
        rule="sensitivity_lower_bound",
        target_sensitivity=target_sensitivity,
        val_sensitivity=float(at_chosen["sensitivity"]),
        val_specificity=float(at_chosen["specificity"]),
        bias=bias,
    )
    return Recalibration(
        operating_point=operating_point,
        n_positive=n_positive,
        n_negative=n_negative,
        n_positive_groups=positive_groups,
        prevalence=n_positive / len(labels),
        sensitivity=float(at_chosen["sensitivity"]),
        sensitivity_lower_bound=sensitivity_lower_bound(
            detected,
            n_positive,
            groups=positive_groups if groups is not None else None,
            confidence=confidence,
        ),
        specificity=float(at_chosen["specificity"]),
        point_estimate_threshold=point,
        point_estimate_specificity=float(at_point["specificity"]),
    )

"""A site's pneumonia prevalence from its unlabeled traffic, and the calibration moved to it.

:func:`estimate_prevalence` is the EM procedure of Saerens, Latinne and Decaestecker (Neural
Computation 14(1), 2002); :func:`prior_adjusted` moves the calibration to the estimate. Both
assume pure prior shift: the images of each class look as they did at training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.special import logit as log_odds

from cxr_platform.calibration.refit import EDGE, RecalibrationError
from cxr_platform.model_version.operating_point import OperatingPoint, calibrated_probabilities


@dataclass(frozen=True)
class PrevalenceEstimate:
    prevalence: float
    training_prevalence: float
    iterations: int
    converged: bool
    n: int


def estimate_prevalence(
    probabilities: np.ndarray,
    training_prevalence: float,
    *,
    tolerance: float = 1e-6,
    max_iterations: int = 1000,
) -> PrevalenceEstimate:
    """The prevalence of unlabeled traffic by EM (Saerens et al. 2002).

    ``probabilities`` are calibrated posteriors under ``training_prevalence`` (the prevalence
    of the split the calibration was fitted on). Each step re-weights every posterior to the
    current prevalence estimate and takes their mean as the next estimate. Only valid under
    prior shift (the images of each class look as they did); acquisition shifts break it, which
    the input-drift signal reports separately.
    """
    posteriors = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), EDGE, 1 - EDGE)
    if not 0 < training_prevalence < 1:
        raise RecalibrationError("the training prevalence must be strictly between 0 and 1")
    if posteriors.size == 0:
        raise RecalibrationError("no probabilities to estimate a prevalence from")
    prevalence = training_prevalence
    for iteration in range(1, max_iterations + 1):
        adjusted = reweighted(posteriors, training_prevalence, prevalence)
        updated = float(adjusted.mean())
        if abs(updated - prevalence) < tolerance:
            return PrevalenceEstimate(
                updated, training_prevalence, iteration, True, posteriors.size
            )
        prevalence = updated
    return PrevalenceEstimate(
        prevalence, training_prevalence, max_iterations, False, posteriors.size
    )


def reweighted(posteriors: np.ndarray, old: float, new: float) -> np.ndarray:
    """Posteriors calibrated at prevalence ``old`` moved to prevalence ``new`` (Bayes)."""
    positive = posteriors * new / old
    negative = (1 - posteriors) * (1 - new) / (1 - old)
    return positive / (positive + negative)


def prior_adjusted(
    operating_point: OperatingPoint, training_prevalence: float, site_prevalence: float
) -> OperatingPoint:
    """The calibration moved to a site's prevalence (Bayes: the log-odds shift by the change in
    prior log-odds), with the threshold moved with it, so every decision stays what it was.

    Under pure prior shift sensitivity and specificity at a fixed score do not change; what does
    is what a probability means. The candidate makes the reported probability (and so PPV and
    NPV) right for the site; it goes through shadow and the gate like any other version.
    """
    shift = float(log_odds(site_prevalence) - log_odds(training_prevalence))
    threshold = float(
        calibrated_probabilities(
            np.array([log_odds(np.clip(operating_point.threshold, EDGE, 1 - EDGE))]), 1.0, shift
        )[0]
    )
    return replace(
        operating_point,
        bias=operating_point.bias + shift,
        threshold=threshold,
        rule=f"{operating_point.rule}+prior_shift",
    )

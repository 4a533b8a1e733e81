"""Logits from logged probabilities, and the prevalence of unlabeled traffic by EM (the paired
site gate is in test_paired.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_platform.calibration.prevalence import estimate_prevalence, prior_adjusted
from cxr_platform.calibration.refit import logits_from_probabilities
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.evaluation import fit_operating_point

TARGET = 0.95


def _site(rng: np.random.Generator, n: int, prevalence: float):
    """Logits of a site whose normal images score higher than at home (the usual failure)."""
    labels = (rng.random(n) < prevalence).astype(int)
    logits = np.where(labels == 1, rng.normal(2.0, 1.2, n), rng.normal(-0.5, 1.2, n))
    return labels, logits


def test_logits_come_back_from_logged_probabilities():
    point = OperatingPoint(0.4, 1.7, "sensitivity_target", 0.95, 0.95, 0.8, bias=-0.6)
    logits = np.linspace(-8, 8, 33)
    assert np.allclose(logits_from_probabilities(point.probabilities(logits), point), logits)


def test_em_recovers_a_sites_prevalence_from_unlabeled_traffic():
    rng = np.random.default_rng(2)
    home_labels, home_logits = _site(rng, 4000, 0.5)
    calibration = fit_operating_point(home_labels, home_logits)
    for prevalence in (0.1, 0.3, 0.7):
        site_labels, site_logits = _site(rng, 3000, prevalence)
        probabilities = calibration.probabilities(site_logits)
        estimate = estimate_prevalence(probabilities, training_prevalence=home_labels.mean())
        assert estimate.converged
        assert estimate.prevalence == pytest.approx(site_labels.mean(), abs=0.03)
        # The plain mean of the posteriors is pulled toward the training prevalence.
        assert abs(probabilities.mean() - site_labels.mean()) > abs(
            estimate.prevalence - site_labels.mean()
        )


def test_a_prior_adjusted_operating_point_changes_probabilities_not_decisions():
    point = OperatingPoint(0.35, 1.3, "sensitivity_target", 0.95, 0.95, 0.8, bias=0.2)
    adjusted = prior_adjusted(point, training_prevalence=0.5, site_prevalence=0.15)
    logits = np.linspace(-6, 6, 241)
    before = point.probabilities(logits) >= point.threshold
    after = adjusted.probabilities(logits) >= adjusted.threshold
    assert (before == after).all()
    assert adjusted.probabilities(logits).mean() < point.probabilities(logits).mean()
    assert adjusted.rule == "sensitivity_target+prior_shift"

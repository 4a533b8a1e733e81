"""Recalibration for a site: a threshold that holds its sensitivity with confidence, label
minimums that say what is missing, and the prevalence of unlabeled traffic by EM."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_platform.calibration.prevalence import estimate_prevalence, prior_adjusted
from cxr_platform.calibration.refit import (
    NotEnoughLabelsError,
    logits_from_probabilities,
    minimum_positives,
    recalibrate,
)
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


def test_the_minimum_number_of_positives_follows_from_the_target():
    assert minimum_positives(0.95) == 59
    assert minimum_positives(0.90) == 29


def test_too_few_labels_are_refused_with_how_many_more_are_needed():
    rng = np.random.default_rng(0)
    labels, logits = _site(rng, 60, 0.3)
    with pytest.raises(NotEnoughLabelsError) as refused:
        recalibrate(labels, logits, target_sensitivity=TARGET)
    positives = int(labels.sum())
    assert refused.value.missing["PNEUMONIA"] == 59 - positives
    assert f"{59 - positives} more PNEUMONIA" in str(refused.value)
    # Studies, not images, count: 80 positive images from 20 studies are 20 cases.
    labels = np.r_[np.ones(80, int), np.zeros(40, int)]
    studies = np.r_[np.repeat(np.arange(20), 4), np.arange(100, 140)].astype(str)
    with pytest.raises(NotEnoughLabelsError) as grouped:
        recalibrate(
            labels, np.r_[np.ones(80), -np.ones(40)], target_sensitivity=TARGET, groups=studies
        )
    assert grouped.value.missing == {"PNEUMONIA": 39, "NORMAL": 0}


def test_the_confident_threshold_holds_the_target_where_the_point_estimate_does_not():
    """Fitted on 200 labels, judged on 20,000 more from the same site, over 40 draws."""
    rng = np.random.default_rng(1)
    held_labels, held_logits = _site(rng, 20_000, 0.5)
    confident, point_estimate, costs = [], [], []
    for _ in range(40):
        labels, logits = _site(rng, 200, 0.5)
        result = recalibrate(labels, logits, target_sensitivity=TARGET)
        probabilities = result.operating_point.probabilities(held_logits)
        positives = held_labels == 1
        confident.append((probabilities[positives] >= result.operating_point.threshold).mean())
        point_estimate.append((probabilities[positives] >= result.point_estimate_threshold).mean())
        costs.append(result.specificity_cost)
        assert result.sensitivity_lower_bound >= TARGET
        assert result.operating_point.rule == "sensitivity_lower_bound"
    assert np.mean(np.array(confident) >= TARGET) >= 0.9
    assert np.mean(np.array(point_estimate) >= TARGET) <= 0.7
    assert np.mean(costs) > 0  # confidence is paid for in specificity, and the price is said


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

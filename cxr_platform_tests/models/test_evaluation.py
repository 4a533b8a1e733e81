"""Metrics against scikit-learn, the threshold rules on constructed scores, calibration, and
the rule that test data never chooses anything."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from cxr_platform.model_version.operating_point import OperatingPoint, calibrated_probabilities
from cxr_platform.models.evaluation import (
    ThresholdRule,
    bootstrap_auc_ci,
    choose_threshold,
    cluster_bootstrap_intervals,
    evaluate_predictions,
    evaluate_split,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    mann_whitney_auc,
    threshold_metrics,
)


def _fixed_vectors(seed: int = 3, n: int = 400):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, n), 0, 1)
    return labels, scores


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.61])
def test_threshold_metrics_equal_scikit_learn(threshold):
    labels, scores = _fixed_vectors()
    predicted = (scores >= threshold).astype(int)
    m = threshold_metrics(labels, scores, threshold)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert m["sensitivity"] == pytest.approx(recall_score(labels, predicted, pos_label=1))
    assert m["specificity"] == pytest.approx(recall_score(labels, predicted, pos_label=0))
    assert m["ppv"] == pytest.approx(precision_score(labels, predicted, pos_label=1))
    assert m["npv"] == pytest.approx(precision_score(labels, predicted, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(labels, predicted))
    assert m["tp"] + m["fn"] == labels.sum() and m["tn"] + m["fp"] == (labels == 0).sum()


def test_undefined_ratios_are_none_not_zero():
    m = threshold_metrics(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]), threshold=0.9)
    assert m["ppv"] is None and m["sensitivity"] == 0.0 and m["specificity"] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=30),
    st.lists(st.integers(0, 6), min_size=1, max_size=30),
)
def test_rank_auc_equals_scikit_learn_including_ties(positives, negatives):
    labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    scores = np.r_[positives, negatives].astype(float)
    assert mann_whitney_auc(np.array(positives, float), np.array(negatives, float)) == (
        pytest.approx(roc_auc_score(labels, scores))
    )


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_data():
    small_labels, small_scores = _fixed_vectors(n=80)
    big_labels, big_scores = _fixed_vectors(n=2000)
    low_s, high_s = bootstrap_auc_ci(small_labels, small_scores, n_bootstrap=500)
    low_b, high_b = bootstrap_auc_ci(big_labels, big_scores, n_bootstrap=500)
    assert low_s < roc_auc_score(small_labels, small_scores) < high_s
    assert low_b < roc_auc_score(big_labels, big_scores) < high_b
    assert high_b - low_b < (high_s - low_s) / 2


# Positives 0.9 0.8 0.7 0.6 0.3; negatives 0.75 0.5 0.4 0.2 0.1.
CONSTRUCTED_LABELS = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
CONSTRUCTED_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.75, 0.5, 0.4, 0.2, 0.1])


def test_patient_resampling_widens_intervals_when_patients_have_several_images():
    """Four near-identical images per patient carry about one patient's worth of evidence:
    an image bootstrap pretends they are four independent cases."""
    rng = np.random.default_rng(3)
    n_patients, per_patient = 120, 4
    patient_labels = rng.integers(0, 2, n_patients)
    patient_scores = rng.normal(patient_labels * 1.2, 1.0)
    labels = np.repeat(patient_labels, per_patient)
    scores = np.repeat(patient_scores, per_patient) + rng.normal(0, 0.05, labels.size)
    patients = np.repeat(np.arange(n_patients), per_patient)
    probabilities = 1 / (1 + np.exp(-scores))

    by_image = cluster_bootstrap_intervals(labels, scores, probabilities, 0.5, n_bootstrap=400)
    by_patient = cluster_bootstrap_intervals(
        labels, scores, probabilities, 0.5, patients, n_bootstrap=400
    )
    for name in ("auc", "sensitivity", "specificity", "ppv", "npv"):
        image_width = by_image[name][1] - by_image[name][0]
        patient_width = by_patient[name][1] - by_patient[name][0]
        assert patient_width > 1.5 * image_width, (name, image_width, patient_width)
    # Every interval brackets its point estimate.
    metrics = threshold_metrics(labels, probabilities, 0.5)
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        low, high = by_patient[name]
        assert low <= metrics[name] <= high


def test_split_evaluation_reports_patient_intervals_at_the_operating_point():
    rng = np.random.default_rng(4)
    labels = np.repeat(rng.integers(0, 2, 60), 2)
    logits = rng.normal(labels * 2.0, 1.0)
    patients = np.repeat([f"P{i}" for i in range(60)], 2)
    point = OperatingPoint(0.5, 1.0, "youden", None, 0.9, 0.9)
    evaluation = evaluate_split("test", labels, logits, point, n_bootstrap=200, patients=patients)
    assert evaluation.interval_unit == "patient" and evaluation.n_patients == 60
    assert evaluation.specificity_ci_low <= evaluation.specificity <= evaluation.specificity_ci_high
    assert evaluation.npv_ci_low is not None and evaluation.ppv_ci_high is not None
    plain = evaluate_split("test", labels, logits, point, n_bootstrap=200)
    assert plain.interval_unit == "image" and plain.n_patients is None


@pytest.mark.parametrize(
    ("target", "threshold", "sensitivity", "specificity"),
    [
        (0.8, 0.6, 0.8, 0.8),  # 4 of 5 positives at >= 0.6; only 0.75 among negatives
        (0.95, 0.3, 1.0, 0.4),  # every positive needs 0.3: three negatives are above it
        (0.4, 0.8, 0.4, 1.0),
    ],
)
def test_sensitivity_target_picks_the_most_specific_threshold(
    target, threshold, sensitivity, specificity
):
    chosen = choose_threshold(
        CONSTRUCTED_LABELS, CONSTRUCTED_SCORES, ThresholdRule("sensitivity_target", target)
    )
    assert chosen == pytest.approx((threshold, sensitivity, specificity))
    applied = threshold_metrics(CONSTRUCTED_LABELS, CONSTRUCTED_SCORES, chosen[0])
    assert applied["sensitivity"] == pytest.approx(sensitivity)


def test_youden_maximizes_sensitivity_plus_specificity():
    threshold, sensitivity, specificity = choose_threshold(
        CONSTRUCTED_LABELS, CONSTRUCTED_SCORES, ThresholdRule("youden")
    )
    assert (threshold, sensitivity, specificity) == pytest.approx((0.6, 0.8, 0.8))


def test_temperature_scaling_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    overconfident = 3.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    raw = expected_calibration_error(labels, calibrated_probabilities(overconfident, 1.0))
    fixed = expected_calibration_error(labels, calibrated_probabilities(overconfident, temperature))
    assert fixed < 0.02 < raw


def test_platt_scaling_undoes_the_intercept_shift_that_temperature_cannot():
    # pos_weight > 1 trains logits that are shifted upwards as well as overconfident.
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    shifted = 2.0 * true_logits + 1.5
    temperature, bias = fit_platt(shifted, labels)
    assert temperature == pytest.approx(2.0, rel=0.05)
    assert bias == pytest.approx(-0.75, abs=0.05)
    platt = expected_calibration_error(labels, calibrated_probabilities(shifted, temperature, bias))
    temperature_only = expected_calibration_error(
        labels, calibrated_probabilities(shifted, fit_temperature(shifted, labels))
    )
    assert platt < 0.02 < temperature_only


def test_test_predictions_never_change_the_operating_point():
    val_labels, val_scores = _fixed_vectors(seed=1)
    val_logits = np.log(val_scores + 1e-3) - np.log(1 - val_scores + 1e-3)
    test_labels, test_scores = _fixed_vectors(seed=2)
    test_logits = np.log(test_scores + 1e-3) - np.log(1 - test_scores + 1e-3)
    reports = [
        evaluate_predictions(
            arch="x", model_name="x", val=(val_labels, val_logits), test=test, n_bootstrap=50
        )
        for test in (
            (test_labels, test_logits),
            (1 - test_labels, -test_logits * 5),
            None,
        )
    ]
    assert reports[0].operating_point == reports[1].operating_point == reports[2].operating_point
    assert reports[0].splits["val"] == reports[1].splits["val"]
    assert reports[0].operating_point.val_sensitivity >= 0.95


def test_report_markdown_states_the_operating_point_and_every_split():
    from cxr_platform.models.reporting import report_markdown

    labels, scores = _fixed_vectors(seed=1)
    logits = np.log(scores + 1e-3) - np.log(1 - scores + 1e-3)
    report = evaluate_predictions(
        arch="a", model_name="m", val=(labels, logits), test=(labels, logits), n_bootstrap=20
    )
    text = report_markdown(report)
    op = report.operating_point
    assert f"**{op.threshold:.4f}**" in text and "rule `sensitivity_target`" in text
    assert f"temperature {op.temperature:.3f}, bias {op.bias:+.3f}" in text
    assert "| val |" in text and "| test |" in text
    assert "{" not in text  # no unformatted placeholders

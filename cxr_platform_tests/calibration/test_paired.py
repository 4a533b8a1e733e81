"""The paired site gate and the label-free estimates, on drawn scores whose truth is known: home
positives and negatives as the validation split holds them, a site where both classes score
higher (the usual calibration shift: more false positives at the same threshold), one where
positives score lower (pneumonia missed), and one like home."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_platform.calibration.label_free import (
    SiteLabels,
    adjusted_count_prevalence,
    confidence_based_estimate,
    trusted_estimate,
)
from cxr_platform.calibration.paired import (
    LOWER,
    RAISE,
    judge,
    paired_difference,
    positive_shift,
)
from cxr_platform.calibration.prevalence import estimate_prevalence
from cxr_platform.calibration.refit import NotEnoughLabelsError
from cxr_platform.calibration.site_point import (
    calls,
    logit_threshold,
    site_operating_point,
)
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.evaluation import fit_operating_point

TARGET, MARGIN = 0.95, 0.02


def draw(rng, n_positive, n_negative, *, positive_shift=0.0, negative_shift=0.0):
    labels = np.r_[np.ones(n_positive, int), np.zeros(n_negative, int)]
    logits = np.r_[
        rng.normal(2.5 + positive_shift, 1.3, n_positive),
        rng.normal(-1.5 + negative_shift, 1.3, n_negative),
    ]
    return labels, logits


@pytest.fixture(scope="module")
def home():
    """The version: its operating point fitted on a validation split of 600 positives (as the
    real one's 580), and those positives' logits (its drift reference)."""
    rng = np.random.default_rng(0)
    labels, logits = draw(rng, 600, 200)
    point = fit_operating_point(labels, logits)  # sensitivity target 0.95
    return point, logits[labels == 1]


def at_site(labels, logits, home):
    """A site's threshold proposed and judged, each image its own study."""
    point, reference = home
    return site_operating_point(
        labels,
        logits,
        np.arange(len(labels)).astype(str),
        reference,
        point,
        target_sensitivity=TARGET,
        margin=MARGIN,
        min_negatives=10,
    )


def rates(labels, called):
    return called[labels == 1].mean(), (~called[labels == 0]).mean()


def test_newcombes_interval_covers_a_paired_difference_as_often_as_it_claims():
    rng = np.random.default_rng(1)
    # Two correlated tests on 80 cases: right together 70%, only the first 15%, only the
    # second 5%: a true difference of 0.10.
    covered = 0
    for _ in range(2000):
        cell = rng.choice(4, size=80, p=[0.70, 0.15, 0.05, 0.10])
        first, second = np.isin(cell, (0, 1)), np.isin(cell, (0, 2))
        interval = paired_difference(first, second, confidence=0.90)
        covered += interval.low <= 0.10 <= interval.high
    assert 0.87 <= covered / 2000 <= 0.95


def test_a_one_way_change_has_a_structural_zero_and_its_share_as_the_difference():
    candidate = np.array([True] * 6 + [False] * 34)  # the candidate un-calls 6 of 40 negatives
    current = np.zeros(40, bool)
    gain = paired_difference(candidate, current, one_way=1)
    assert gain.difference == pytest.approx(6 / 40)
    assert 0 < gain.low < 6 / 40 < gain.high
    # Nothing changed: zero, and the interval says how large an unseen change could be.
    same = paired_difference(current, current, one_way=1)
    assert same.low == 0 and same.high > 0
    lost = paired_difference(current, current, one_way=-1)
    assert lost.high == 0 and lost.low < 0


def test_the_shift_of_a_sites_positives_is_recovered_and_a_change_of_shape_is_noticed(home):
    _, reference = home
    rng = np.random.default_rng(2)
    shifted = rng.normal(2.5 + 1.5, 1.3, 60)
    shift = positive_shift(shifted, reference)
    assert shift.low < 1.5 < shift.high and shift.borrowed
    # Studies of two images each count as half as many independent cases: a wider interval.
    grouped = positive_shift(shifted, reference, groups=np.repeat(np.arange(30), 2))
    assert grouped.high - grouped.low > shift.high - shift.low
    stretched = positive_shift(rng.normal(2.5, 4.0, 200), reference)
    assert not stretched.borrowed


def test_a_site_where_everything_scores_higher_gets_its_specificity_back(home):
    point, reference = home
    rng = np.random.default_rng(3)
    labels, logits = draw(rng, 60, 40, positive_shift=1.5, negative_shift=1.5)  # 100 labels
    evidence = at_site(labels, logits, home)
    assert evidence.proposal.direction == RAISE and evidence.passed, evidence.judgement.reasons
    assert evidence.judgement.sensitivity_from == "validation positives, shifted"
    # On the rest of the site (fresh images), the candidate keeps the sensitivity the margin
    # allows and buys specificity; what it was expected to do is what it does.
    fresh_labels, fresh_logits = draw(rng, 6000, 4000, positive_shift=1.5, negative_shift=1.5)
    before = rates(fresh_labels, calls(point, fresh_logits))
    after = rates(fresh_labels, calls(evidence.operating_point, fresh_logits))
    assert after[0] >= TARGET - MARGIN
    assert after[1] > before[1] + 0.1
    low, high = evidence.judgement.candidate_sensitivity[1:]
    assert low - 0.01 <= after[0] <= high + 0.01
    gain = evidence.judgement.specificity
    assert gain.low > 0


def test_a_site_that_misses_pneumonia_gets_a_lower_threshold(home):
    point, reference = home
    rng = np.random.default_rng(4)
    labels, logits = draw(rng, 80, 40, positive_shift=-1.2)
    evidence = at_site(labels, logits, home)
    assert evidence.proposal.direction == LOWER and evidence.passed
    fresh_labels, fresh_logits = draw(rng, 6000, 4000, positive_shift=-1.2)
    assert rates(fresh_labels, calls(point, fresh_logits))[0] < 0.9
    assert rates(fresh_labels, calls(evidence.operating_point, fresh_logits))[0] >= TARGET - MARGIN


def test_a_site_like_home_keeps_its_threshold_and_is_told_what_would_move_it(home):
    point, reference = home
    rng = np.random.default_rng(5)
    labels, logits = draw(rng, 60, 40)
    evidence = at_site(labels, logits, home)
    assert not evidence.passed
    needed = evidence.labels_to_decide
    assert needed is None or (needed["PNEUMONIA"] > 0 and needed["NORMAL"] > 0)


def test_too_few_labels_say_how_many_more_of_each_class(home):
    point, reference = home
    labels, logits = draw(np.random.default_rng(6), 8, 4)
    with pytest.raises(NotEnoughLabelsError) as raised:
        at_site(labels, logits, home)
    assert raised.value.missing == {"PNEUMONIA": 7, "NORMAL": 6}


def test_a_candidate_the_evidence_cannot_place_is_undecided_with_the_labels_that_would(home):
    point, reference = home
    rng = np.random.default_rng(7)
    labels, logits = draw(rng, 25, 60, positive_shift=1.0, negative_shift=1.0)
    current = logit_threshold(point)
    # A threshold that detects about 0.96 here: 25 positives cannot place it above the floor
    # (0.93), more would.
    shift = positive_shift(logits[labels == 1], reference).shift
    candidate = float(np.quantile(reference, 1 - 0.96)) + shift
    judgement = judge(
        labels,
        logits,
        reference,
        candidate_threshold=candidate,
        current_threshold=current,
        target_sensitivity=TARGET,
        margin=MARGIN,
    )
    assert judgement.direction == RAISE and judgement.verdict == "undecided"
    assert any(r.startswith("sensitivity not held") for r in judgement.reasons)
    assert judgement.labels_to_decide["PNEUMONIA"] > 0


def test_a_threshold_that_loses_sensitivity_is_judged_worse_not_undecided(home):
    point, reference = home
    rng = np.random.default_rng(8)
    labels, logits = draw(rng, 200, 60)
    judgement = judge(
        labels,
        logits,
        reference,
        candidate_threshold=float(np.quantile(reference, 0.3)),  # misses about 30%
        current_threshold=logit_threshold(point),
        target_sensitivity=TARGET,
        margin=MARGIN,
    )
    assert judgement.verdict == "worse" and not judgement.passed


def test_label_free_estimates_hold_where_the_calibration_holds_and_refit_where_it_does_not(home):
    point, _ = home
    rng = np.random.default_rng(9)
    labels, logits = draw(rng, 900, 2100)  # a site at prevalence 0.3, like home otherwise
    probabilities = point.probabilities(logits)
    called = probabilities >= point.threshold
    truth_sens, truth_spec = rates(labels, called)
    # Calibrated at home's prevalence (0.75), so moved to the site's (EM's estimate) first.
    em = estimate_prevalence(probabilities, 0.75).prevalence
    assert em == pytest.approx(0.3, abs=0.03)
    cbpe = confidence_based_estimate(probabilities, point.threshold, prior=(0.75, em))
    assert cbpe.sensitivity == pytest.approx(truth_sens, abs=0.03)
    assert cbpe.specificity == pytest.approx(truth_spec, abs=0.03)
    # Both classes score 1.5 higher: the version's calibration now lies, CBPE with it.
    labels, logits = draw(rng, 900, 2100, positive_shift=1.5, negative_shift=1.5)
    probabilities = point.probabilities(logits)
    called = probabilities >= point.threshold
    truth_sens, truth_spec = rates(labels, called)
    wrong = confidence_based_estimate(probabilities, point.threshold)
    assert abs(wrong.specificity - truth_spec) > 0.1
    labeled = rng.choice(len(labels), 100, replace=False)
    site = SiteLabels(logits[labeled], labels[labeled], called[labeled])
    estimate = trusted_estimate(
        probabilities,
        point.threshold,
        logits=logits,
        em_prevalence=None,
        calibration_suspect=True,
        site_labels=site,
    )
    assert estimate.trusted == "refitted cbpe and adjusted count"
    assert estimate.refitted.specificity == pytest.approx(truth_spec, abs=0.06)
    assert estimate.adjusted.low <= labels.mean() <= estimate.adjusted.high
    # Without labels, a window whose inputs drifted trusts neither.
    blind = trusted_estimate(
        probabilities, point.threshold, logits=logits, em_prevalence=0.5, calibration_suspect=True
    )
    assert blind.trusted == "none" and "label at least" in blind.why


def test_the_adjusted_count_needs_labels_that_separate_the_classes():
    called = np.array([True, False] * 50)
    result = adjusted_count_prevalence(called, np.array([1, 0, 1, 0]), np.array([1, 1, 1, 1]))
    assert result.prevalence is None
    with pytest.raises(ValueError, match="both classes"):
        adjusted_count_prevalence(called, np.array([1, 1]), np.array([1, 0]))


def test_an_operating_point_keeps_its_decisions_in_logit_units(home):
    point, _ = home
    moved = OperatingPoint(0.7, 2.0, "x", TARGET, 0.9, 0.9, bias=0.3)
    for version in (point, moved):
        at = logit_threshold(version)
        assert calls(version, np.array([at + 1e-6]))[0]
        assert not calls(version, np.array([at - 1e-6]))[0]

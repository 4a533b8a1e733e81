"""The paired site gate and the label-free estimates, on drawn scores whose truth is known: home
positives and negatives as the validation split holds them, a site where both classes score
higher (the usual calibration shift: more false positives at the same threshold), one where
positives score lower (pneumonia missed), one like home, and the review's site: its positives
score higher but a subgroup of them is missed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import norm

from cxr_platform.calibration.label_free import (
    SiteLabels,
    adjusted_count_prevalence,
    confidence_based_estimate,
    trusted_estimate,
)
from cxr_platform.calibration.paired import (
    BORROWED,
    LOWER,
    RAISE,
    SAME,
    SITE_OWN,
    TAIL_ALPHA,
    ReferencePositives,
    SiteSensitivity,
    judge,
    paired_difference,
    positive_shift,
)
from cxr_platform.calibration.prevalence import estimate_prevalence
from cxr_platform.calibration.refit import NotEnoughLabelsError
from cxr_platform.calibration.site import no_threshold_text
from cxr_platform.calibration.site_point import (
    calls,
    logit_threshold,
    site_operating_point,
)
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.evaluation import fit_operating_point

TARGET, MARGIN = 0.95, 0.02
HOME_POSITIVES = (2.5, 1.3)  # the validation positives' population, logit units


def draw(rng, n_positive, n_negative, *, positive_shift=0.0, negative_shift=0.0, spread=1.0):
    labels = np.r_[np.ones(n_positive, int), np.zeros(n_negative, int)]
    logits = np.r_[
        rng.normal(HOME_POSITIVES[0] + positive_shift, HOME_POSITIVES[1] * spread, n_positive),
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


def at_site(labels, logits, home, **kwargs):
    """A site's threshold proposed and judged, each image its own study."""
    point, reference = home
    return site_operating_point(
        labels,
        logits,
        np.arange(len(labels)).astype(str),
        reference,
        point,
        target_sensitivity=kwargs.pop("target", TARGET),
        margin=kwargs.pop("margin", MARGIN),
        min_negatives=10,
        **kwargs,
    )


def rates(labels, called):
    return called[labels == 1].mean(), (~called[labels == 0]).mean()


# The review's simulation: validation positives N(2, 1.5); the site's positives 88% N(3, 1) and
# 12% N(-1.5, 1) (a subgroup the model misses there), negatives N(0, 1.3); target 0.95, margin
# 0.05; the current threshold where the site's true sensitivity is 0.915.
REVIEW = ((0.88, 3.0, 1.0), (0.12, -1.5, 1.0))
REVIEW_MARGIN = 0.05


def review_sensitivity(threshold: float) -> float:
    return sum(w * norm.sf(threshold, mu, sd) for w, mu, sd in REVIEW)


@pytest.fixture(scope="module")
def review_home():
    reference = np.random.default_rng(0).normal(2.0, 1.5, 580)
    current = brentq(lambda t: review_sensitivity(t) - 0.915, -5, 5)
    point = OperatingPoint(float(expit(current)), 1.0, "x", TARGET, 0.95, 0.9, bias=0.0)
    return point, reference


def review_site(rng, n_positive, n_negative):
    subgroup = rng.random(n_positive) < REVIEW[1][0]
    positives = np.where(
        subgroup, rng.normal(-1.5, 1.0, n_positive), rng.normal(3.0, 1.0, n_positive)
    )
    labels = np.r_[np.ones(n_positive, int), np.zeros(n_negative, int)]
    return labels, np.r_[positives, rng.normal(0.0, 1.3, n_negative)], subgroup


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
    # The same images from 20 studies are 20 independent cases: a wider interval, same share.
    by_study = paired_difference(candidate, current, one_way=1, studies=20)
    assert by_study.difference == gain.difference and by_study.studies == 20
    assert by_study.low < gain.low and by_study.high > gain.high
    # Nothing changed: zero, and the interval says how large an unseen change could be.
    same = paired_difference(current, current, one_way=1)
    assert same.low == 0 and same.high > 0
    lost = paired_difference(current, current, one_way=-1)
    assert lost.high == 0 and lost.low < 0


def test_the_shift_of_a_sites_positives_is_recovered_and_a_missed_subgroup_is_noticed(home):
    _, reference = home
    rng = np.random.default_rng(2)
    shifted = rng.normal(HOME_POSITIVES[0] + 1.5, HOME_POSITIVES[1], 60)
    shift = positive_shift(shifted, reference)
    assert shift.low < shift.aim_low < 1.5 < shift.high and shift.borrowed
    # Studies of two images each count as half as many independent cases: a wider interval.
    grouped = positive_shift(shifted, reference, groups=np.repeat(np.arange(30), 2))
    assert grouped.high - grouped.low > shift.high - shift.low
    # 6 of 60 far below the rest: rejected, although a location test would not see them.
    missed = shifted.copy()
    missed[:6] = rng.normal(-2.0, 1.0, 6)
    tail = positive_shift(missed, reference).tail
    assert tail.rejected and tail.p_value < TAIL_ALPHA
    assert tail.below_5th_percentile >= 6 > tail.expected_below_5th_percentile


def test_the_tail_check_rejects_a_true_shift_model_about_as_often_as_its_level(home):
    """Its two parts each reject a true model at most ``TAIL_ALPHA`` of the time."""
    point, reference = home
    rng = np.random.default_rng(12)
    current = logit_threshold(point)
    rejected = {15: 0, 40: 0}
    for studies in rejected:
        for _ in range(300):
            site = rng.normal(HOME_POSITIVES[0] + 0.5, HOME_POSITIVES[1], studies)
            shift = positive_shift(site, reference, current_threshold=current)
            rejected[studies] += shift.tail.rejected
    for studies, count in rejected.items():
        assert count / 300 <= 2 * TAIL_ALPHA + 0.03, (studies, count)


def test_the_reviews_missed_subgroup_does_not_talk_the_gate_into_raising(review_home):
    """The review's site with 60 positive studies: the gate before this raised the threshold in
    98 of these 100 draws, every time below the floor. A raise the truth shows below the floor
    is unsafe. What is left is the site's own positives' 95% claim at its worst: the site sits
    just above the floor, and about 1 draw in 20 shows it at the target (a binomial spread of
    about 2 in 100 draws: at most 10 allowed)."""
    point, reference = review_home
    rng = np.random.default_rng(2024)
    floor = TARGET - REVIEW_MARGIN
    unsafe = raised = 0
    for _ in range(100):
        labels, logits, _ = review_site(rng, 60, 140)
        evidence = at_site(labels, logits, (point, reference), margin=REVIEW_MARGIN)
        if evidence.passed and evidence.proposal.direction == RAISE:
            raised += 1
            unsafe += review_sensitivity(evidence.proposal.threshold) < floor
    assert unsafe <= 10, (unsafe, raised)


def test_one_seen_case_of_the_subgroup_turns_the_borrowing_off(review_home):
    """25 positives as in the review's run, two of them in the missed subgroup: the old gate
    raised the threshold ("better") on the validation positives moved; now the site's own
    positives speak, and they cannot show a raise safe."""
    point, reference = review_home
    rng = np.random.default_rng(5)
    while True:
        labels, logits, subgroup = review_site(rng, 25, 75)
        if subgroup.sum() == 2 and (logits[:25][subgroup] < logit_threshold(point)).all():
            break
    evidence = at_site(labels, logits, (point, reference), margin=REVIEW_MARGIN)
    tail = evidence.proposal.shift.tail
    assert tail.rejected and tail.missed_now == 2 and tail.expected_missed_now < 0.5
    assert evidence.judgement.sensitivity_from == SITE_OWN
    assert not (evidence.passed and evidence.proposal.direction == RAISE)


def test_the_validation_positives_stand_in_only_where_they_are_more_cases_than_the_sites(home):
    """The same 80 positive studies, the same passed tail check: 600 validation patients stand
    in for them, 60 patients' worth of the same logits do not (the site's own positives carry
    as much, with no assumption). Which bound comes out higher never decides."""
    _, reference = home
    site = np.random.default_rng(31).normal(HOME_POSITIVES[0] + 0.5, HOME_POSITIVES[1], 80)
    many = SiteSensitivity(site, ReferencePositives(reference, 600))
    few = SiteSensitivity(site, ReferencePositives(reference, 60))
    assert many.shift.borrowed and few.shift.borrowed
    assert many.source == BORROWED and few.source == SITE_OWN
    threshold = float(np.quantile(site, 0.1))
    assert few.at(threshold).estimate == pytest.approx(few.own(threshold))
    assert many.at(threshold).estimate != pytest.approx(many.own(threshold))


def test_a_site_where_everything_scores_higher_gets_its_specificity_back(home):
    point, reference = home
    rng = np.random.default_rng(3)
    labels, logits = draw(rng, 60, 40, positive_shift=1.5, negative_shift=1.5)  # 100 labels
    evidence = at_site(labels, logits, home)
    assert evidence.proposal.direction == RAISE and evidence.passed, evidence.judgement.reasons
    assert evidence.judgement.sensitivity_from == BORROWED
    assert {check.name for check in evidence.judgement.checks} == {
        "site_sensitivity_floor",
        "site_sensitivity_target",
        "site_own_positives",
        "site_positives_lost",
        "site_specificity_gain",
    }
    # On the rest of the site (fresh images), the candidate keeps the sensitivity the claim
    # says and buys at least the specificity the gate asked for.
    fresh_labels, fresh_logits = draw(rng, 6000, 4000, positive_shift=1.5, negative_shift=1.5)
    before = rates(fresh_labels, calls(point, fresh_logits))
    after = rates(fresh_labels, calls(evidence.operating_point, fresh_logits))
    assert after[0] >= TARGET - MARGIN
    assert after[1] >= before[1] + evidence.judgement.min_specificity_gain
    low, high = evidence.judgement.candidate_sensitivity[1:]
    assert low - 0.01 <= after[0] <= high + 0.01
    gain = evidence.judgement.specificity
    assert gain.low <= after[1] - before[1] <= gain.high


def test_a_gain_of_one_negative_is_not_worth_a_new_version(home):
    """The old gate called a candidate superior whenever one negative lay between the two
    thresholds (a structural-zero Wilson bound of 0.0011 for 1 of 200)."""
    point, reference = home
    rng = np.random.default_rng(13)
    labels, logits = draw(rng, 60, 200, positive_shift=1.5)
    current = logit_threshold(point)
    negatives = np.sort(logits[labels == 0])
    above = negatives[negatives >= current]
    candidate = (above[0] + above[1]) / 2  # un-calls exactly one negative
    judgement = judge(
        labels,
        logits,
        reference,
        candidate_threshold=candidate,
        current_threshold=current,
        target_sensitivity=TARGET,
        margin=MARGIN,
    )
    assert judgement.specificity.b == 1 and judgement.specificity.low > 0
    gain = {check.name: check for check in judgement.checks}["site_specificity_gain"]
    assert not gain.passed and gain.limit == 0.02
    assert not judgement.passed and judgement.verdict == "undecided"


def test_a_candidate_that_loses_the_sites_own_positives_is_refused(home):
    """The same candidate passes on a site whose positives lie as the moved validation
    positives do, and is refused once five of them lie between the two thresholds: the paired
    loss on the site's own positives enters the verdict."""
    point, reference = home
    rng = np.random.default_rng(0)
    labels, logits = draw(rng, 60, 60, positive_shift=1.5, negative_shift=1.5)
    current = logit_threshold(point)
    evidence = at_site(labels, logits, home)
    assert evidence.passed and evidence.proposal.direction == RAISE
    candidate = evidence.proposal.threshold
    positives = np.flatnonzero(labels == 1)
    moved = logits.copy()
    moved[positives[:5]] = rng.uniform(current + 0.3, candidate - 0.05, 5)
    judgement = judge(
        labels,
        moved,
        reference,
        candidate_threshold=candidate,
        current_threshold=current,
        target_sensitivity=TARGET,
        margin=MARGIN,
    )
    checks = {check.name: check for check in judgement.checks}
    assert judgement.sensitivity_from == BORROWED
    assert not checks["site_positives_lost"].passed
    assert not checks["site_own_positives"].passed
    assert not judgement.passed
    assert judgement.sensitivity.c >= 5 and judgement.sensitivity.difference <= -5 / 60


def test_a_site_that_misses_pneumonia_gets_a_lower_threshold(home):
    point, reference = home
    rng = np.random.default_rng(4)
    labels, logits = draw(rng, 80, 40, positive_shift=-1.2)
    evidence = at_site(labels, logits, home)
    assert evidence.proposal.direction == LOWER and evidence.passed
    assert evidence.judgement.sensitivity_from == BORROWED
    fresh_labels, fresh_logits = draw(rng, 6000, 4000, positive_shift=-1.2)
    assert rates(fresh_labels, calls(point, fresh_logits))[0] < 0.9
    assert rates(fresh_labels, calls(evidence.operating_point, fresh_logits))[0] >= TARGET


def test_a_site_under_target_whose_shape_differs_is_brought_back_on_its_own_positives(home):
    """40 positives detected at 0.75, spread wider than home's (the shift model is rejected):
    the old gate asked the candidate's lower bound to reach the target itself and stayed."""
    point, reference = home
    rng = np.random.default_rng(15)
    current = logit_threshold(point)
    positives = rng.normal(current + 1.2, 2.2, 4000)
    while True:
        labels, logits = draw(rng, 40, 60)
        logits[:40] = rng.choice(positives, 40)
        if 0.7 <= np.mean(logits[:40] >= current) <= 0.8:
            break
    evidence = at_site(labels, logits, home)
    judgement = evidence.judgement
    assert evidence.proposal.current_shown_below_target
    assert evidence.proposal.direction == LOWER and evidence.passed, judgement.reasons
    assert judgement.current_shown_below_target
    after = np.mean(positives >= evidence.proposal.threshold)
    assert after >= TARGET - MARGIN


def test_a_site_shown_below_target_with_a_missed_subgroup_is_brought_back_on_its_own_positives(
    home,
):
    """Four of 16 positive studies far below the rest: the shift model is rejected, and the
    site's own positives alone bring it back (no floor is certified for a repair: any lower
    threshold detects at least what the current one, shown short, does). Where no threshold
    could be proposed, what is said of the current one never calls it safe."""
    point, reference = home
    rng = np.random.default_rng(16)
    labels, logits = draw(rng, 16, 30)
    logits[:4] = logit_threshold(point) - rng.uniform(3.0, 6.0, 4)  # four missed, far below
    evidence = at_site(labels, logits, home)
    assert evidence.judgement.sensitivity_from == SITE_OWN
    assert evidence.proposal.current_shown_below_target
    assert evidence.proposal.direction == LOWER and evidence.passed, evidence.judgement.reasons
    assert np.all(logits[:16] >= evidence.proposal.threshold)  # every own positive detected
    stayed = dataclasses.replace(
        evidence,
        proposal=dataclasses.replace(
            evidence.proposal,
            threshold=evidence.proposal.current_threshold,
            direction=SAME,
        ),
    )
    text = no_threshold_text("7", stayed)
    assert "shown below the target" in text and "safe" not in text


def test_a_site_like_home_keeps_its_threshold_and_is_told_what_would_move_it(home):
    point, reference = home
    rng = np.random.default_rng(5)
    labels, logits = draw(rng, 60, 40)
    evidence = at_site(labels, logits, home)
    assert not evidence.passed
    assert evidence.proposal.direction == SAME
    assert not evidence.proposal.current_shown_below_target
    # What more labels at the same rates would let a threshold be proposed: the same multiple
    # of each class.
    needed = evidence.labels_to_decide
    assert needed["PNEUMONIA"] > 0 and needed["PNEUMONIA"] / 60 == needed["NORMAL"] / 40


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
    # A threshold that detects about 0.97 here: 25 positives cannot place it above the floor
    # (0.93), more would. (Nearer the target, no number of site labels would: the validation
    # positives' own sampling bounds what the moved ones can show.)
    shift = positive_shift(logits[labels == 1], reference).shift
    candidate = float(np.quantile(reference, 1 - 0.97)) + shift
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
    failed = {check.name for check in judgement.checks if not check.passed}
    assert "site_sensitivity_floor" in failed
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


def test_a_refit_needs_labels_of_both_classes_and_an_adjusted_count_that_exists(home):
    point, _ = home
    rng = np.random.default_rng(17)
    labels, logits = draw(rng, 300, 700, positive_shift=1.5, negative_shift=1.5)
    probabilities = point.probabilities(logits)
    called = probabilities >= point.threshold
    # 40 labels with a single positive: a Platt refit on it would follow that one image.
    one_positive = np.r_[np.flatnonzero(labels == 1)[:1], np.flatnonzero(labels == 0)[:39]]
    lone = SiteLabels(logits[one_positive], labels[one_positive], called[one_positive])
    estimate = trusted_estimate(
        probabilities,
        point.threshold,
        logits=logits,
        em_prevalence=None,
        calibration_suspect=True,
        site_labels=lone,
    )
    assert not lone.usable and estimate.refitted is None and estimate.trusted == "none"
    # Labels enough, but the version calls every image alike: no adjusted count to trust.
    labeled = rng.choice(len(labels), 100, replace=False)
    every = np.ones(len(labels), bool)
    alike = SiteLabels(logits[labeled], labels[labeled], every[labeled])
    estimate = trusted_estimate(
        point.probabilities(logits + 30),
        point.threshold,
        logits=logits + 30,
        em_prevalence=None,
        calibration_suspect=True,
        site_labels=alike,
    )
    assert estimate.adjusted is not None and estimate.adjusted.prevalence is None
    assert estimate.trusted == "refitted cbpe" and "adjusted count cannot" in estimate.why


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

"""A site's operating point judged paired against the one it has, with the evidence a site's few
labels can give and the validation split's positives where they still describe the site.

Why not certify an absolute sensitivity from the site's labels: a 95% lower bound of 0.95 needs
59 positive studies even when every one is detected, so a hundred labels can never move the
threshold, and a few hundred move it down to the lowest positive score. The question a site can
answer is narrower: *is this operating point better for us than the current one, without losing
sensitivity that matters?*

- **How positives score at the site.** The validation split's positives (hundreds, in the
  version's drift reference) say how the score of a pneumonia case is distributed. A site's
  positives are tested against that distribution moved by one shift in logit units
  (:func:`positive_shift`: Hodges-Lehmann estimate, Moses' distribution-free interval with the
  site's positive *studies* as the sample size). Where one shift describes them (Kolmogorov-
  Smirnov after the shift), the site's sensitivity at any threshold is read off the shifted
  validation positives: a few dozen site positives fix a location far better than they fix a
  5th percentile. Where it does not, that is said, and only the site's own positives are used.
- **The candidate** (:func:`propose`) is the highest threshold whose sensitivity, read off the
  validation positives moved by the *lower* end of the shift's interval, reaches the target. It
  depends on the positives only, so every site negative is fresh evidence for the gate.
- **The gate** (:func:`judge`) compares candidate and current on the same held-out studies.
  Raising the threshold: specificity must be superior (the lower end of the paired difference's
  interval above zero) and sensitivity non-inferior within ``margin`` (only the positives the two
  call differently carry information: counted on the site's held-out positives, Newcombe's
  paired interval; or, where the shift model holds on them, bounded by the validation positives
  between the two thresholds). Lowering it: the current version must be shown below the target
  at this site. When the evidence says neither better nor worse, the refusal says how many more
  labels would decide.

Intervals for paired proportions: Newcombe, *Statistics in Medicine* 17 (1998) 2635-2650,
method 10 (Wilson score intervals of each proportion combined with the pairs' correlation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import ks_2samp, norm

# A shift model the site's positives reject at this level is not borrowed.
BORROW_P_VALUE = 0.05
# The gate's intervals: two-sided 90%, so each one-sided claim (superior, non-inferior) is made
# at 95%.
GATE_CONFIDENCE = 0.90
# How many times its held-out labels a site is asked about; beyond the last, no number is given.
SCALES = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)
RAISE, LOWER, SAME = "raise", "lower", "same"


def _wilson(successes: float, trials: float, z: float) -> tuple[float, float]:
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedDifference:
    """Candidate minus current, on the same cases; ``a`` both right, ``b`` only the candidate,
    ``c`` only the current, ``d`` neither."""

    a: float
    b: float
    c: float
    d: float
    low: float
    high: float

    @property
    def n(self) -> float:
        return self.a + self.b + self.c + self.d

    @property
    def difference(self) -> float:
        return (self.b - self.c) / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "n": self.n, "difference": self.difference}


def paired_difference(
    candidate_right: np.ndarray,
    current_right: np.ndarray,
    *,
    confidence: float = GATE_CONFIDENCE,
    scale: float = 1.0,
    one_way: int = 0,
) -> PairedDifference:
    """Newcombe's method 10 interval for the difference of two paired proportions.
    ``scale``: the same table with every count multiplied (what more labels at the same rates
    would show). ``one_way``: +1 (-1) when the candidate can only gain (lose) by construction, as
    a threshold moved on the same scores: one discordant cell is then a structural zero, and the
    difference is the other cell's share, with its Wilson interval."""
    candidate_right = np.asarray(candidate_right, dtype=bool)
    current_right = np.asarray(current_right, dtype=bool)
    a = float((candidate_right & current_right).sum()) * scale
    b = float((candidate_right & ~current_right).sum()) * scale
    c = float((~candidate_right & current_right).sum()) * scale
    d = float((~candidate_right & ~current_right).sum()) * scale
    structural_zero = c if one_way > 0 else b
    if one_way and structural_zero == 0 and a + b + c + d > 0:
        z = float(norm.ppf(1 - (1 - confidence) / 2))
        low, high = _wilson(b if one_way > 0 else c, a + b + c + d, z)
        if one_way < 0:
            low, high = -high, -low
        return PairedDifference(a, b, c, d, low, high)
    return _newcombe(a, b, c, d, confidence)


def _newcombe(a: float, b: float, c: float, d: float, confidence: float) -> PairedDifference:
    n = a + b + c + d
    if n == 0:
        return PairedDifference(a, b, c, d, -1.0, 1.0)
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = _wilson(a + b, n, z)
    l2, u2 = _wilson(a + c, n, z)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    numerator = a * d - b * c
    if numerator > 0:
        numerator = max(numerator - n / 2, 0.0)
    phi = numerator / math.sqrt(denominator) if denominator > 0 else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    difference = p1 - p2
    return PairedDifference(a, b, c, d, max(-1.0, difference - below), min(1.0, difference + above))


@dataclass(frozen=True)
class PositiveShift:
    """Site positives against the validation positives, in logit units."""

    shift: float  # Hodges-Lehmann: the median of every site-minus-validation difference
    low: float
    high: float
    confidence: float  # two-sided, of [low, high]
    n_site: int
    n_site_studies: int
    n_reference: int
    fit_p_value: float  # K-S of the site's positives against the shifted validation positives

    @property
    def borrowed(self) -> bool:
        """Whether one shift describes the site's positives, so the validation's may stand in."""
        return self.fit_p_value >= BORROW_P_VALUE

    def narrowed(self, scale: float) -> PositiveShift:
        """The interval ``scale`` times as many site positives would give, at the same shift."""
        factor = 1 / math.sqrt(scale)
        return PositiveShift(
            self.shift,
            self.shift - (self.shift - self.low) * factor,
            self.shift + (self.high - self.shift) * factor,
            self.confidence,
            int(self.n_site * scale),
            int(self.n_site_studies * scale),
            self.n_reference,
            self.fit_p_value,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "borrowed": self.borrowed}


def positive_shift(
    site_logits: np.ndarray,
    reference_logits: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    confidence: float = GATE_CONFIDENCE,
) -> PositiveShift:
    """The shift of the site's positive logits from the validation positives' with Moses'
    interval (order statistics of the pairwise differences at the Mann-Whitney critical value).
    Images of one study are not independent: the interval is computed with the number of
    positive studies as the site's sample size, which is conservative when they agree."""
    site = np.asarray(site_logits, dtype=np.float64).ravel()
    reference = np.sort(np.asarray(reference_logits, dtype=np.float64).ravel())
    if site.size == 0 or reference.size == 0:
        raise ValueError("a shift needs site positives and reference positives")
    studies = len(set(np.asarray(groups).tolist())) if groups is not None else site.size
    studies = max(1, min(studies, site.size))
    differences = np.sort((site[:, None] - reference[None, :]).ravel())
    shift = float(np.median(differences))
    m, n = studies, reference.size
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    k = int(math.floor(m * n / 2 - z * math.sqrt(m * n * (m + n + 1) / 12)))
    # With fewer studies than images, the same rank of the smaller sample, scaled to the pairs.
    k = int(k * site.size / m)
    k = min(max(k, 0), differences.size - 1)
    low, high = float(differences[k]), float(differences[differences.size - 1 - k])
    fit = ks_2samp(site, reference + shift)
    return PositiveShift(
        shift,
        min(low, shift),
        max(high, shift),
        confidence,
        int(site.size),
        int(studies),
        int(reference.size),
        float(fit.pvalue),
    )


def _threshold_for(positive_logits: np.ndarray, target: float) -> float:
    """The highest threshold that ``score >= threshold`` detects ``target`` of these at."""
    ordered = np.sort(np.asarray(positive_logits, dtype=np.float64))[::-1]
    needed = max(1, math.ceil(target * ordered.size - 1e-9))
    return float(ordered[min(needed, ordered.size) - 1])


def shifted_sensitivity(reference_logits: np.ndarray, shift: float, threshold: float) -> float:
    """Sensitivity at ``threshold`` of the validation positives moved by ``shift``."""
    return float(np.mean(np.asarray(reference_logits) + shift >= threshold))


Interval = tuple[float, float, float]  # estimate, low, high
_SEARCH_STEPS = 48  # bisection steps for a threshold (logit units, from a 40-logit bracket)


class SiteSensitivity:
    """A site's sensitivity at any threshold, with its interval: the validation positives moved
    by the site positives' shift where one shift describes them, else the site's positives
    alone (Wilson). ``scale``: as if the site had that many times its positives."""

    def __init__(
        self,
        site_positive_logits: np.ndarray,
        reference_positive_logits: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        scale: float = 1.0,
        shift: PositiveShift | None = None,
    ) -> None:
        self.site = np.asarray(site_positive_logits, dtype=np.float64)
        self.reference = np.asarray(reference_positive_logits, dtype=np.float64)
        if self.site.size == 0:
            raise ValueError("a site's sensitivity needs its positives")
        fitted = shift or positive_shift(self.site, self.reference, groups=groups)
        self.shift = fitted.narrowed(scale) if scale != 1.0 else fitted
        self.scale = scale
        self._z = float(norm.ppf(1 - (1 - GATE_CONFIDENCE) / 2))

    @property
    def borrowed(self) -> bool:
        return self.shift.borrowed

    @property
    def source(self) -> str:
        return "validation positives, shifted" if self.borrowed else "site positives"

    def _reference_bounds(self, shift: float, threshold: float) -> tuple[float, float]:
        """Wilson bounds of the moved validation positives' detected share: they are a sample
        too (about +-0.015 at 0.95 for 580 of them)."""
        detected = float((self.reference + shift >= threshold).sum())
        return _wilson(detected, self.reference.size, self._z)

    def at(self, threshold: float) -> Interval:
        if self.borrowed:
            return (
                shifted_sensitivity(self.reference, self.shift.shift, threshold),
                self._reference_bounds(self.shift.low, threshold)[0],
                self._reference_bounds(self.shift.high, threshold)[1],
            )
        detected = float((self.site >= threshold).sum())
        low, high = _wilson(detected * self.scale, self.site.size * self.scale, self._z)
        return detected / self.site.size, low, high

    def holds(self, candidate: float, current: float, target: float, margin: float) -> bool:
        """Whether ``candidate`` keeps the site's sensitivity: at the estimate, at least the
        target (or the current threshold's, where that is lower), and at the low end of the
        interval at least ``target - margin``. Sensitivity above the target is what a site may
        trade for specificity; the margin is room for the estimate's uncertainty, not a level
        to aim at. Nothing may go where the current threshold is below ``target - margin``
        already."""
        floor = target - margin
        current_estimate = self.at(current)[0]
        if current_estimate < floor:
            return candidate <= current
        estimate, low, _ = self.at(candidate)
        return estimate >= min(target, current_estimate) - 1e-12 and low >= floor - 1e-12


def _highest(holds, low: float, high: float) -> float | None:
    """The highest threshold in [low, high] where ``holds`` (true below, false above)."""
    if not holds(low):
        return None
    if holds(high):
        return high
    for _ in range(_SEARCH_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if holds(middle) else (low, middle)
    return low


@dataclass(frozen=True)
class Proposal:
    """A candidate threshold (logit units) and what it is expected to do at the site."""

    threshold: float
    current_threshold: float
    direction: str  # raise, lower or same
    sensitivity_from: str  # "validation positives, shifted" or "site positives"
    shift: PositiveShift
    expected_sensitivity: Interval
    current_expected_sensitivity: Interval
    # Candidate minus current specificity on the site's negatives (none used to propose it).
    expected_specificity_gain: PairedDifference

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["shift"] = self.shift.to_dict()
        values["expected_specificity_gain"] = self.expected_specificity_gain.to_dict()
        return values


# Which way a moved threshold can change each class's calls on the same scores: raising it can
# only gain specificity (and lose sensitivity), lowering it the reverse.
_GAINS = {RAISE: 1, LOWER: -1, SAME: 0}


def _direction(candidate: float, current: float) -> str:
    return RAISE if candidate > current else LOWER if candidate < current else SAME


def propose(
    labels: np.ndarray,
    logits: np.ndarray,
    reference_positive_logits: np.ndarray,
    current_threshold: float,
    *,
    target_sensitivity: float,
    margin: float,
    groups: np.ndarray | None = None,
    scale: float = 1.0,
    shift: PositiveShift | None = None,
) -> Proposal:
    """The candidate from the site's positives: where the current threshold is shown below the
    target here, the highest threshold that restores it at the low end of its interval;
    otherwise the highest threshold whose sensitivity :meth:`SiteSensitivity.holds`. The site's
    negatives only say what it is expected to gain. ``shift``: the site positives' shift when
    already estimated (asking what ``scale`` times the labels would show)."""
    labels = np.asarray(labels).astype(int).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    positives, negatives = labels == 1, labels == 0
    model = SiteSensitivity(
        logits[positives],
        reference_positive_logits,
        groups=None if groups is None else np.asarray(groups)[positives],
        scale=scale,
        shift=shift,
    )
    current = float(current_threshold)
    if model.at(current)[2] < target_sensitivity:
        found = _highest(lambda t: model.at(t)[1] >= target_sensitivity, current - 40, current)
        threshold = current if found is None else found
    else:
        found = _highest(
            lambda t: model.holds(t, current, target_sensitivity, margin), current, current + 40
        )
        threshold = current if found is None else found
    direction = _direction(threshold, current)
    gains = _GAINS[direction]
    gain = paired_difference(
        logits[negatives] < threshold, logits[negatives] < current, one_way=gains
    )
    return Proposal(
        threshold=float(threshold),
        current_threshold=current,
        direction=direction,
        sensitivity_from=model.source,
        shift=model.shift,
        expected_sensitivity=model.at(threshold),
        current_expected_sensitivity=model.at(current),
        expected_specificity_gain=gain,
    )


@dataclass(frozen=True)
class Judgement:
    """The paired gate's verdict, and its evidence."""

    direction: str
    passed: bool
    verdict: str  # better, worse, undecided, same
    specificity: PairedDifference  # candidate minus current, on every site negative
    sensitivity: PairedDifference  # candidate minus current, on the site's positives
    candidate_sensitivity: Interval  # at the site (see ``sensitivity_from``)
    current_sensitivity: Interval
    sensitivity_from: str
    shift: PositiveShift | None
    margin: float
    target_sensitivity: float
    reasons: tuple[str, ...]
    labels_to_decide: dict[str, int] | None = None  # more labels per class that would decide

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["specificity"] = self.specificity.to_dict()
        values["sensitivity"] = self.sensitivity.to_dict()
        values["shift"] = None if self.shift is None else self.shift.to_dict()
        values["reasons"] = list(self.reasons)
        return values


def judge(
    labels: np.ndarray,
    logits: np.ndarray,
    reference_positive_logits: np.ndarray,
    *,
    candidate_threshold: float,
    current_threshold: float,
    target_sensitivity: float,
    margin: float,
    groups: np.ndarray | None = None,
    candidate_calls: np.ndarray | None = None,
    current_calls: np.ndarray | None = None,
) -> Judgement:
    """Candidate against current on the same labeled studies. ``candidate_calls`` and
    ``current_calls``: the decisions as each version makes them (its own probability
    threshold), where float rounding could differ from ``logit >= threshold``.

    Raising the threshold on the same scores can only un-call images: specificity cannot fall
    and sensitivity cannot rise, so each paired table has a structural zero and its difference
    is the share of one class between the two thresholds. Raising passes when that share of
    negatives is shown above zero and :meth:`SiteSensitivity.holds`; lowering, when the current
    threshold is shown below the target at this site. Neither shown: undecided, with how many
    more labels at the same rates would decide."""
    labels = np.asarray(labels).astype(int).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    candidate = (
        logits >= candidate_threshold if candidate_calls is None else np.asarray(candidate_calls)
    )
    current = logits >= current_threshold if current_calls is None else np.asarray(current_calls)
    positives, negatives = labels == 1, labels == 0
    direction = _direction(candidate_threshold, current_threshold)
    gains = _GAINS[direction]
    site_groups = None if groups is None else np.asarray(groups)[positives]
    base = SiteSensitivity(logits[positives], reference_positive_logits, groups=site_groups)

    def verdict(scale: float) -> tuple[str, list[str], tuple]:
        model = (
            base
            if scale == 1.0
            else SiteSensitivity(
                logits[positives], reference_positive_logits, shift=base.shift, scale=scale
            )
        )
        specificity = paired_difference(
            ~candidate[negatives], ~current[negatives], scale=scale, one_way=gains
        )
        sensitivity = paired_difference(
            candidate[positives], current[positives], scale=scale, one_way=-gains
        )
        cand, curr = model.at(candidate_threshold), model.at(current_threshold)
        evidence = (specificity, sensitivity, cand, curr, model)
        if direction == SAME:
            return "same", ["the candidate's threshold is the current one"], evidence
        if direction == LOWER:
            if curr[2] < target_sensitivity:
                return (
                    "better",
                    [
                        f"the current threshold detects at most {curr[2]:.3f} here, below the "
                        f"target {target_sensitivity:g}"
                    ],
                    evidence,
                )
            if curr[0] >= target_sensitivity:
                return (
                    "worse",
                    [
                        f"the current threshold already detects {curr[0]:.3f} here (target "
                        f"{target_sensitivity:g}): a lower one would only cost specificity"
                    ],
                    evidence,
                )
            return (
                "undecided",
                [
                    f"the current threshold's sensitivity here ({curr[0]:.3f}) is not shown below "
                    f"the target {target_sensitivity:g} (it may reach {curr[2]:.3f})"
                ],
                evidence,
            )
        floor = target_sensitivity - margin
        if cand[2] < floor:
            return (
                "worse",
                [f"the candidate detects at most {cand[2]:.3f} here, below {floor:.3f}"],
                evidence,
            )
        superior = specificity.low > 0
        holds = model.holds(candidate_threshold, current_threshold, target_sensitivity, margin)
        reasons = []
        if not superior:
            reasons.append(
                f"no specificity gain shown: {specificity.difference:+.3f} on "
                f"{int(negatives.sum())} negatives (lower {specificity.low:+.3f})"
            )
        if not holds:
            reasons.append(
                f"sensitivity not held: the candidate detects an estimated {cand[0]:.3f} here "
                f"({min(target_sensitivity, curr[0]):.3f} wanted) and may detect as little as "
                f"{cand[1]:.3f} (floor {floor:.3f}; from the {model.source})"
            )
        return ("better" if superior and holds else "undecided"), reasons, evidence

    result, reasons, (specificity, sensitivity, cand, curr, model) = verdict(1.0)
    needed = None
    if result == "undecided":
        scale = next((k for k in SCALES if verdict(k)[0] != "undecided"), None)
        if scale is not None:
            needed = {
                "PNEUMONIA": int(math.ceil(positives.sum() * (scale - 1))),
                "NORMAL": int(math.ceil(negatives.sum() * (scale - 1))),
            }
    return Judgement(
        direction=direction,
        passed=result == "better",
        verdict=result,
        specificity=specificity,
        sensitivity=sensitivity,
        candidate_sensitivity=cand,
        current_sensitivity=curr,
        sensitivity_from=model.source,
        shift=model.shift,
        margin=margin,
        target_sensitivity=target_sensitivity,
        reasons=tuple(reasons),
        labels_to_decide=needed,
    )

"""A site's operating point judged paired against the one it has, on the evidence a site's few
labels can give and the validation split's positives where the site's own do not contradict them.

**What a passed verdict claims.** A raised threshold detects at least ``target - margin`` (the
floor) of the site's pneumonia images with probability at least 95% over the site's labels, and
keeps the estimated sensitivity at or above ``target`` (sensitivity above the target is what a
site may trade for specificity). A lowered one, where the current threshold is shown below the
target, reaches ``target`` with probability at least 80% and detects that share of the site's
own positives; it needs no floor, since it detects at least what the current threshold, shown
short, does. The claims are for the whole procedure that chose the threshold from those labels,
not only for a threshold fixed in advance. Where the validation positives stand in for the
site's, they hold under the assumption below, and the assumption is tested where it matters.

**Why the claim survives choosing the threshold from the same labels.** Each bound ``L(t)`` used
here falls as the threshold ``t`` rises, and the candidate is the highest ``t`` with
``L(t) >= floor``. If the true sensitivity ``S`` at the candidate were below the floor, the
candidate would lie above ``t*``, the highest threshold where ``S`` reaches it, and then
``L(t*+) >= floor > S(t*+)``: the bound would have failed at a threshold fixed by the truth,
not by the data. That happens with probability at most the bound's own error. So a bound that
holds at each fixed threshold holds at the crossing picked from the data.

**The site's sensitivity at any threshold** (:class:`SiteSensitivity`), one of two ways:

- *Borrowed*: the validation positives (hundreds, in the version's drift reference) moved by the
  site positives' shift in logit units (:func:`positive_shift`: Hodges-Lehmann estimate, Moses'
  distribution-free interval with the site's positive *studies* as the sample size). A few
  dozen site positives fix a location far better than a 5th percentile. A bound moves the
  validation positives by the interval's end and subtracts a Wilson margin for their own
  sampling, counted by their patients (:class:`ReferencePositives`); the two errors are
  independent, and the sum of their one-sided margins at a
  confidence covers their sum at least that often where each is near normal. The assumption:
  below the thresholds that matter, the site's positives are no heavier-tailed than the
  validation positives moved by one shift.
- *The site's own positives*, Wilson bounds with the positive studies as the sample size, where
  the assumption is rejected, or where the site has as many positive studies as the validation
  positives have patients. Valid without the assumption, and wide: 25 studies all detected
  bound the sensitivity at 0.90.

**Shape checked where it matters** (:func:`tail_check`): a subgroup the model misses at the site
(a share of its positives far below the rest) is what borrowing would hide, and hundreds of
moved validation positives would outvote it. Two one-sided checks against the validation
positives moved by the lower end of the shift's 80% interval: a scan over the studies' conformal
p-values in the lower tail (how far down the moved validation positives each study's lowest
image lies), and the count of studies the current threshold misses against how many one shift
would. The upper tail and the middle are not looked at: positives scoring higher hide no missed
case. Their level and power, on simulated and real scores, are measured in
``benchmarks/site_recalibration.py``; rejecting costs only the borrowing. A subgroup of one or
two studies among a few dozen cannot be told from chance by any test, and the benchmark says
how often that lets a raise through.

**The candidate** (:func:`propose`) reads the site's positives only:

- where the current threshold is shown below the target here (the upper bound under it),
  *repair*: the highest lower threshold that meets the repair's claim;
- where the current threshold meets the claim, the highest threshold that still does;
- otherwise the current threshold stays and the evidence says how many labels would move it.

**The gate** (:func:`judge`) compares candidate and current on the same studies. Raising passes
when the candidate meets the claim, the site's own positives do not contradict it (the share the
candidate still detects of them is at least the floor, and it does not lose more of them than
the moved validation positives predict between the two thresholds: the paired loss, by
discordant images), and the specificity gain on the site's negatives, which the proposal never
read, is worth a version (at least ``min_specificity_gain`` at the lower end of its interval).
Lowering passes when the current threshold is shown below the target (its upper bound, counted
by studies, under it: the same kind of evidence raising asks for its floor) and the candidate
meets the repair's claim. Neither shown: undecided, with how many more labels at the same rates
would decide.

Intervals for paired proportions: Newcombe, *Statistics in Medicine* 17 (1998) 2635-2650, method
10. Conformal p-values: Bates et al., *Annals of Statistics* 51 (2023) 149-178. The scan over
order statistics: Berk and Jones, *Z. Wahrscheinlichkeitstheorie* 47 (1979) 47-59.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import binom, norm

# One-sided confidence of "the served sensitivity is at least target - margin".
CLAIM_CONFIDENCE = 0.95
# One-sided confidence of "the served sensitivity is at least the target".
AIM_CONFIDENCE = 0.80
# The shift model is rejected at this level. Rejecting is the safe side (it costs the borrowing
# only), so the level is generous.
TAIL_ALPHA = 0.10
# The paired differences' intervals: two-sided 90%, so each one-sided claim is made at 95%.
GATE_CONFIDENCE = 0.90
# The specificity a raised threshold must gain at the lower end of its interval, by default,
# and that interval's one-sided confidence. It says whether a change is worth a new version,
# not whether it is safe (the sensitivity claim says that). One negative between the two
# thresholds among 200 never is; among 26 (100 labels at a prevalence of 0.74) it is. At 80%
# two were needed there, and a site under blur kept 43% of the specificity it could gain.
MIN_SPECIFICITY_GAIN = 0.02
WORTH_CONFIDENCE = 0.70
# How many times its labels a site is asked about; beyond the last, no number is given.
SCALES = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)
RAISE, LOWER, SAME = "raise", "lower", "same"
BORROWED = "validation positives, shifted"
SITE_OWN = "site positives"


def _one_sided_z(confidence: float) -> float:
    return float(norm.ppf(confidence))


# A borrowed bound rests on two independent samples (the site's positives place the shift, the
# validation positives give the shape), and it subtracts both margins, each one-sided at the
# claim's confidence: their sum covers the sum of the two errors at least that often where each
# error is near normal (s1 + s2 >= sqrt(s1^2 + s2^2)). A Bonferroni split, each margin at half
# the error, cost a third of the specificity a site gained and bought nothing measurable.
_CLAIM_Z = _one_sided_z(CLAIM_CONFIDENCE)
_AIM_Z = _one_sided_z(AIM_CONFIDENCE)


def _wilson(successes: float, trials: float, z: float) -> tuple[float, float]:
    if trials <= 0:
        return 0.0, 1.0
    p = min(max(successes / trials, 0.0), 1.0)
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return max(0.0, centre - half), min(1.0, centre + half)


def _study_count(groups: np.ndarray | None, n: int) -> int:
    """Independent units among ``n`` images: their studies (each image its own without)."""
    if groups is None:
        return n
    return max(1, min(n, len(set(np.asarray(groups).tolist())))) if n else 0


@dataclass(frozen=True)
class ReferencePositives:
    """The validation positives' logits (the version's drift reference) and how many patients
    they are: images of one patient are not independent, so their own sampling error is that
    of ``studies`` cases, not of as many images."""

    logits: np.ndarray
    studies: int

    @classmethod
    def of(cls, reference: np.ndarray | ReferencePositives) -> ReferencePositives:
        if isinstance(reference, ReferencePositives):
            return reference
        logits = np.asarray(reference, dtype=np.float64).ravel()
        return cls(logits, int(logits.size))

    @property
    def size(self) -> int:
        return int(self.logits.size)


@dataclass(frozen=True)
class PairedDifference:
    """Candidate minus current, on the same cases; ``a`` both right, ``b`` only the candidate,
    ``c`` only the current, ``d`` neither. The counts are images; the interval treats them as
    ``studies`` independent cases (images of one study agree more than strangers do)."""

    a: float
    b: float
    c: float
    d: float
    low: float
    high: float
    studies: float | None = None

    @property
    def n(self) -> float:
        return self.a + self.b + self.c + self.d

    @property
    def difference(self) -> float:
        return (self.b - self.c) / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, float | None]:
        return {**asdict(self), "n": self.n, "difference": self.difference}


def paired_difference(
    candidate_right: np.ndarray,
    current_right: np.ndarray,
    *,
    confidence: float = GATE_CONFIDENCE,
    scale: float = 1.0,
    one_way: int = 0,
    studies: int | None = None,
) -> PairedDifference:
    """Newcombe's method 10 interval for the difference of two paired proportions.
    ``scale``: the same table with every count multiplied (what more labels at the same rates
    would show). ``one_way``: +1 (-1) when the candidate can only gain (lose) by construction, as
    a threshold moved on the same scores: one discordant cell is then a structural zero, and the
    difference is the other cell's share, with its Wilson interval. ``studies``: how many
    independent cases the images are (the interval is as wide as that many cases give)."""
    candidate_right = np.asarray(candidate_right, dtype=bool)
    current_right = np.asarray(current_right, dtype=bool)
    images = candidate_right.size
    cells = np.array(
        [
            (candidate_right & current_right).sum(),
            (candidate_right & ~current_right).sum(),
            (~candidate_right & current_right).sum(),
            (~candidate_right & ~current_right).sum(),
        ],
        dtype=np.float64,
    )
    effective = scale * (min(studies, images) / images if studies and images else 1.0)
    a, b, c, d = cells * effective
    counted = None if studies is None else float(min(studies, images) * scale)
    structural_zero = c if one_way > 0 else b
    if one_way and structural_zero == 0 and a + b + c + d > 0:
        z = float(norm.ppf(1 - (1 - confidence) / 2))
        low, high = _wilson(b if one_way > 0 else c, a + b + c + d, z)
        if one_way < 0:
            low, high = -high, -low
        return PairedDifference(*(cells * scale), low, high, counted)
    interval = _newcombe(a, b, c, d, confidence)
    return PairedDifference(*(cells * scale), interval[0], interval[1], counted)


def _newcombe(a: float, b: float, c: float, d: float, confidence: float) -> tuple[float, float]:
    n = a + b + c + d
    if n == 0:
        return -1.0, 1.0
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
    return max(-1.0, difference - below), min(1.0, difference + above)


@dataclass(frozen=True)
class TailCheck:
    """Whether the site's positive studies lie in the moved validation positives' lower tail
    more often, or further down, than one shift allows: a scan over the lowest studies, and a
    count of those the current threshold misses."""

    p_value: float  # the scan's
    alpha: float
    n_studies: int
    # Studies whose lowest image lies below the moved validation positives' 5th percentile,
    # and how many one shift would put there: what a reader checks the verdict against.
    below_5th_percentile: int
    expected_below_5th_percentile: float
    lowest_study_p: float  # the most extreme study's conformal p-value
    # Studies with an image the current threshold misses, how many one shift would give, and
    # the chance of at least that many under it.
    missed_now: int = 0
    expected_missed_now: float = 0.0
    missed_now_p_value: float = 1.0

    @property
    def rejected(self) -> bool:
        return bool(self.p_value < self.alpha or self.missed_now_p_value < self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rejected": self.rejected}


def _at_least(count: int, chances: np.ndarray) -> float:
    """``P(X >= count)`` for X the number of successes of independent trials with ``chances``
    (Poisson-binomial, by its exact recursion)."""
    if count <= 0:
        return 1.0
    distribution = np.zeros(chances.size + 1)
    distribution[0] = 1.0
    for chance in chances:
        distribution[1:] = distribution[1:] * (1 - chance) + distribution[:-1] * chance
        distribution[0] *= 1 - chance
    return float(min(1.0, distribution[count:].sum()))


def _study_minima(site: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each positive study's lowest logit and its number of images."""
    if groups is None:
        return site, np.ones(site.size, dtype=int)
    keys = np.asarray(groups).astype(str)
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], site[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.minimum.reduceat(values, starts), np.diff(np.r_[starts, keys.size])


# The lower tail the check looks at: order statistics of the studies' p-values up to this.
TAIL_REGION = 0.2
_NULL_DRAWS = 4000


def _tail_statistic(p_values: np.ndarray) -> np.ndarray:
    """Per row of sorted p-values (..., m): the smallest, over the order statistics in the
    lower tail, of the chance that the k-th smallest of m uniform p-values lies as low
    (``P(Binomial(m, p_(k)) >= k)``). One study far down and several a little down both make
    it small."""
    m = p_values.shape[-1]
    k = np.arange(1, m + 1)
    chances = binom.sf(k - 1, m, p_values)
    chances = np.where(p_values <= TAIL_REGION, chances, 1.0)
    return chances.min(axis=-1)


@lru_cache(maxsize=64)
def _null_statistics(m: int, n_reference: int) -> np.ndarray:
    """The statistic's distribution under the shift model for ``m`` studies against
    ``n_reference`` validation positives: conformal ranks are uniform on 1..n+1 there."""
    rng = np.random.default_rng(m * 100_003 + n_reference)
    ranks = rng.integers(1, n_reference + 2, size=(_NULL_DRAWS, m))
    return np.sort(_tail_statistic(np.sort(ranks / (n_reference + 1), axis=1)))


def tail_check(
    site_logits: np.ndarray,
    reference_logits: np.ndarray | ReferencePositives,
    shift: float,
    *,
    groups: np.ndarray | None = None,
    current_threshold: float | None = None,
    alpha: float = TAIL_ALPHA,
) -> TailCheck:
    """Two one-sided checks of the site's positive studies against the validation positives
    moved by ``shift``; a true shift model is rejected by them at most twice ``alpha`` of the
    time.

    - The scan: per study, the conformal p-value of its lowest logit among the moved
      validation positives (the chance that the lowest of as many images from them lies as
      low); then, over the order statistics in the lower tail, the least likely one under the
      model, calibrated by drawing the model's own p-values (a Berk-Jones-type scan). A share
      of studies far below the rest is rejected however few the studies are.
    - The count: where the current threshold is given, the studies it misses against how many
      the moved validation positives would (exact, Poisson-binomial): the cut a raise starts
      from.

    Both read the tail, where a shift estimated too high makes a true model look short of
    positives: the caller moves the validation positives by the lower end of the shift's 80%
    interval. With the estimate itself, a true model was rejected 13-18% of the time at 30-60
    studies on the real model's scores, and a site under target with the real positives'
    shape lost its borrowing in a quarter of draws."""
    site = np.asarray(site_logits, dtype=np.float64).ravel()
    moved = np.sort(ReferencePositives.of(reference_logits).logits) + shift
    minima, images = _study_minima(site, groups)
    n = moved.size
    at_or_below = np.searchsorted(moved, minima, side="right")
    share = (1 + at_or_below) / (n + 1)
    p_values = np.sort(1 - (1 - np.minimum(share, 1.0)) ** images)
    m = p_values.size
    null = _null_statistics(int(m), int(n))
    observed = float(_tail_statistic(p_values))
    p_value = (1 + int(np.searchsorted(null, observed, side="right"))) / (null.size + 1)
    fifth = float(np.quantile(moved, 0.05))
    missed = expected_missed = 0.0
    missed_p = 1.0
    if current_threshold is not None:
        below_now = float(np.mean(moved < current_threshold))
        chances = 1 - (1 - below_now) ** images
        missed = int((minima < current_threshold).sum())
        expected_missed = float(chances.sum())
        missed_p = _at_least(int(missed), chances)
    return TailCheck(
        p_value=float(p_value),
        alpha=alpha,
        n_studies=int(m),
        below_5th_percentile=int((minima < fifth).sum()),
        expected_below_5th_percentile=float((1 - 0.95**images).sum()),
        lowest_study_p=float(p_values[0]) if m else 1.0,
        missed_now=int(missed),
        expected_missed_now=expected_missed,
        missed_now_p_value=missed_p,
    )


def _moses(differences: np.ndarray, m: int, n: int, z: float) -> tuple[float, float]:
    """Moses' distribution-free interval for a shift from the sorted pairwise differences, at
    the one-sided normal quantile ``z``, with ``m`` site studies and ``n`` reference patients
    as the sample sizes (the same rank, scaled to the pairs of images, where either has fewer
    cases than images)."""
    k = int(math.floor(m * n / 2 - z * math.sqrt(m * n * (m + n + 1) / 12)))
    k = int(k * differences.size / (m * n))
    k = min(max(k, 0), differences.size - 1)
    return float(differences[k]), float(differences[differences.size - 1 - k])


@dataclass(frozen=True)
class PositiveShift:
    """Site positives against the validation positives, in logit units."""

    shift: float  # Hodges-Lehmann: the median of every site-minus-validation difference
    low: float  # one-sided at the claim's confidence, and high likewise
    high: float
    aim_low: float  # one-sided at the aim's confidence
    n_site: int
    n_site_studies: int
    n_reference: int
    tail: TailCheck

    @property
    def borrowed(self) -> bool:
        """Whether the validation positives, moved, may stand in for the site's."""
        return not self.tail.rejected

    def narrowed(self, scale: float) -> PositiveShift:
        """The interval ``scale`` times as many site positives would give, at the same shift."""
        factor = 1 / math.sqrt(scale)
        return PositiveShift(
            self.shift,
            self.shift - (self.shift - self.low) * factor,
            self.shift + (self.high - self.shift) * factor,
            self.shift - (self.shift - self.aim_low) * factor,
            int(self.n_site * scale),
            int(self.n_site_studies * scale),
            self.n_reference,
            self.tail,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tail": self.tail.to_dict(), "borrowed": self.borrowed}


def positive_shift(
    site_logits: np.ndarray,
    reference_logits: np.ndarray | ReferencePositives,
    *,
    groups: np.ndarray | None = None,
    current_threshold: float | None = None,
) -> PositiveShift:
    """The shift of the site's positive logits from the validation positives' with Moses'
    interval (order statistics of the pairwise differences at the Mann-Whitney critical value),
    and the tail check of the moved validation positives. Images of one study are not
    independent: the interval is computed with the number of positive studies as the site's
    sample size, which is conservative when they agree."""
    site = np.asarray(site_logits, dtype=np.float64).ravel()
    positives = ReferencePositives.of(reference_logits)
    reference = np.sort(positives.logits)
    if site.size == 0 or reference.size == 0:
        raise ValueError("a shift needs site positives and reference positives")
    studies = _study_count(groups, site.size)
    differences = np.sort((site[:, None] - reference[None, :]).ravel())
    shift = float(np.median(differences))
    low, high = _moses(differences, studies, positives.studies, _CLAIM_Z)
    aim_low, _ = _moses(differences, studies, positives.studies, _AIM_Z)
    return PositiveShift(
        shift,
        min(low, shift),
        max(high, shift),
        min(aim_low, shift),
        int(site.size),
        int(studies),
        int(reference.size),
        tail_check(
            site,
            positives,
            min(aim_low, shift),
            groups=groups,
            current_threshold=current_threshold,
        ),
    )


class Interval(NamedTuple):
    estimate: float
    low: float  # at the claim's confidence
    high: float


_SEARCH_STEPS = 48  # bisection steps for a threshold (logit units, from a 40-logit bracket)


class SiteSensitivity:
    """A site's sensitivity at any threshold with its bounds: borrowed where the tail check
    lets the moved validation positives stand in, else the site's own positives (Wilson, by
    studies). ``scale``: as if the site had that many times its positives."""

    def __init__(
        self,
        site_positive_logits: np.ndarray,
        reference_positive_logits: np.ndarray | ReferencePositives,
        *,
        groups: np.ndarray | None = None,
        scale: float = 1.0,
        shift: PositiveShift | None = None,
        current_threshold: float | None = None,
    ) -> None:
        self.site = np.asarray(site_positive_logits, dtype=np.float64)
        positives = ReferencePositives.of(reference_positive_logits)
        self.reference = positives.logits
        # The validation positives' own sampling, as that of their patients.
        self.reference_cases = positives.studies
        if self.site.size == 0:
            raise ValueError("a site's sensitivity needs its positives")
        fitted = shift or positive_shift(
            self.site, positives, groups=groups, current_threshold=current_threshold
        )
        self.shift = fitted.narrowed(scale) if scale != 1.0 else fitted
        self.scale = scale
        self.studies = fitted.n_site_studies * scale

    @property
    def borrowed(self) -> bool:
        """The moved validation positives stand in where the tail check lets them and they are
        more cases than the site's own positive studies; with as many of its own, the site's
        positives say as much with no assumption. (Decided by the counts, never by which bound
        comes out higher.)"""
        return bool(self.shift.borrowed and self.reference_cases > self.studies)

    @property
    def source(self) -> str:
        return BORROWED if self.borrowed else SITE_OWN

    def _moved_share(self, shift: float, threshold: float) -> float:
        return float(np.mean(self.reference + shift >= threshold))

    def own(self, threshold: float) -> float:
        """The share of the site's own positive images detected at ``threshold``."""
        return float(np.mean(self.site >= threshold))

    def at(self, threshold: float) -> Interval:
        """Estimate and bounds at the claim's confidence (each side one-sided)."""
        n = self.reference_cases
        if self.borrowed:
            return Interval(
                self._moved_share(self.shift.shift, threshold),
                _wilson(self._moved_share(self.shift.low, threshold) * n, n, _CLAIM_Z)[0],
                _wilson(self._moved_share(self.shift.high, threshold) * n, n, _CLAIM_Z)[1],
            )
        estimate = self.own(threshold)
        low, high = _wilson(estimate * self.studies, self.studies, _CLAIM_Z)
        return Interval(estimate, low, high)

    def aim(self, threshold: float) -> float:
        """The lower bound at the aim's confidence."""
        if self.borrowed:
            n = self.reference_cases
            return _wilson(self._moved_share(self.shift.aim_low, threshold) * n, n, _AIM_Z)[0]
        return _wilson(self.own(threshold) * self.studies, self.studies, _AIM_Z)[0]

    def meets(self, threshold: float, target: float, margin: float, *, repair: bool) -> bool:
        """The claim at ``threshold``. A raise: at least ``target - margin`` at the claim's
        confidence and the target at the estimate. A repair (the current threshold shown below
        the target): the target at the aim's confidence, and the target's share of the site's
        own positives detected; no floor is asked of it, since any lower threshold detects at
        least what the current one, shown short, does."""
        if repair:
            return self.aim(threshold) >= target - 1e-12 and self.own(threshold) >= target - 1e-12
        return (
            self.at(threshold).low >= target - margin - 1e-12
            and self.at(threshold).estimate >= target - 1e-12
        )

    def shown_below(self, threshold: float, target: float) -> bool:
        """The sensitivity at ``threshold`` is shown below ``target`` (its upper bound under)."""
        return self.at(threshold).high < target

    def expected_loss(self, current: float, candidate: float) -> float:
        """The share of positives the moved validation positives put between two thresholds."""
        low, high = sorted((current, candidate))
        moved = self.reference + self.shift.shift
        return float(np.mean((moved >= low) & (moved < high)))


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
    sensitivity_from: str  # BORROWED or SITE_OWN
    shift: PositiveShift
    expected_sensitivity: Interval
    current_expected_sensitivity: Interval
    # Candidate minus current specificity on the site's negatives (none used to propose it).
    expected_specificity_gain: PairedDifference
    current_shown_below_target: bool

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["shift"] = self.shift.to_dict()
        values["expected_specificity_gain"] = self.expected_specificity_gain.to_dict()
        values["expected_sensitivity"] = list(self.expected_sensitivity)
        values["current_expected_sensitivity"] = list(self.current_expected_sensitivity)
        return values


# Which way a moved threshold can change each class's calls on the same scores: raising it can
# only gain specificity (and lose sensitivity), lowering it the reverse.
_GAINS = {RAISE: 1, LOWER: -1, SAME: 0}


def _direction(candidate: float, current: float) -> str:
    return RAISE if candidate > current else LOWER if candidate < current else SAME


def _groups_of(groups: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
    return None if groups is None else np.asarray(groups)[mask]


def propose(
    labels: np.ndarray,
    logits: np.ndarray,
    reference_positive_logits: np.ndarray | ReferencePositives,
    current_threshold: float,
    *,
    target_sensitivity: float,
    margin: float,
    groups: np.ndarray | None = None,
    scale: float = 1.0,
    shift: PositiveShift | None = None,
) -> Proposal:
    """The candidate from the site's positives (see the module's docstring); the site's
    negatives only say what it is expected to gain. ``shift``: the site positives' shift when
    already estimated (asking what ``scale`` times the labels would show)."""
    labels = np.asarray(labels).astype(int).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    positives, negatives = labels == 1, labels == 0
    current = float(current_threshold)
    model = SiteSensitivity(
        logits[positives],
        reference_positive_logits,
        groups=_groups_of(groups, positives),
        scale=scale,
        shift=shift,
        current_threshold=current,
    )

    below = model.shown_below(current, target_sensitivity)

    def meets(threshold: float) -> bool:
        return model.meets(threshold, target_sensitivity, margin, repair=below)

    if below:
        found = _highest(meets, current - 40, current)
    elif meets(current):
        found = _highest(meets, current, current + 40)
    else:
        found = None
    threshold = current if found is None else found
    direction = _direction(threshold, current)
    gain = paired_difference(
        logits[negatives] < threshold,
        logits[negatives] < current,
        one_way=_GAINS[direction],
        studies=_study_count(_groups_of(groups, negatives), int(negatives.sum())),
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
        current_shown_below_target=bool(below),
    )


@dataclass(frozen=True)
class PairedCheck:
    """One condition of the verdict, with the figure it was decided on."""

    name: str
    passed: bool
    value: float
    limit: float
    reason: str  # said when it failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Judgement:
    """The paired gate's verdict, and its evidence."""

    direction: str
    passed: bool
    verdict: str  # better, worse, undecided, same
    specificity: PairedDifference  # candidate minus current, on every site negative
    sensitivity: PairedDifference  # candidate minus current, on the site's own positives
    candidate_sensitivity: Interval  # at the site (see ``sensitivity_from``)
    current_sensitivity: Interval
    sensitivity_from: str
    shift: PositiveShift | None
    margin: float
    target_sensitivity: float
    min_specificity_gain: float
    checks: tuple[PairedCheck, ...]
    reasons: tuple[str, ...]  # the failed checks' reasons, or why it is worse or the same
    # The site's own positives: the share each threshold detects, and the share the moved
    # validation positives put between the two (what the paired loss is checked against).
    candidate_own_sensitivity: float = float("nan")
    current_own_sensitivity: float = float("nan")
    expected_loss: float = 0.0
    loss_p_value: float = 1.0
    labels_to_decide: dict[str, int] | None = None  # more labels per class that would decide

    @property
    def current_shown_below_target(self) -> bool:
        return bool(self.current_sensitivity.high < self.target_sensitivity)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["specificity"] = self.specificity.to_dict()
        values["sensitivity"] = self.sensitivity.to_dict()
        values["candidate_sensitivity"] = list(self.candidate_sensitivity)
        values["current_sensitivity"] = list(self.current_sensitivity)
        values["shift"] = None if self.shift is None else self.shift.to_dict()
        values["checks"] = [check.to_dict() for check in self.checks]
        values["reasons"] = list(self.reasons)
        values["current_shown_below_target"] = self.current_shown_below_target
        return values


def _loss_p_value(lost: int, positives: int, expected: float) -> float:
    """One-sided: the chance of losing at least ``lost`` of ``positives`` images where the moved
    validation positives lose ``expected`` of them. Images are counted as independent, which
    rejects more readily than studies would: the safe side of this check."""
    if lost == 0:
        return 1.0
    return float(binom.sf(lost - 1, positives, min(max(expected, 0.0), 1.0)))


def _sensitivity_checks(
    model: SiteSensitivity, threshold: float, target: float, margin: float, *, repair: bool
) -> list[PairedCheck]:
    """The claim at the candidate (:meth:`SiteSensitivity.meets`), check by check."""
    at, floor = model.at(threshold), target - margin
    where = f"from the {model.source}"
    if repair:
        aim, own = model.aim(threshold), model.own(threshold)
        return [
            PairedCheck(
                "site_sensitivity_target",
                aim >= target - 1e-12,
                aim,
                target,
                f"the candidate is not shown to reach the target {target:g} here at "
                f"{AIM_CONFIDENCE:.0%} (at least {aim:.3f}; estimate {at.estimate:.3f}, {where})",
            ),
            PairedCheck(
                "site_own_positives",
                own >= target - 1e-12,
                own,
                target,
                f"the candidate detects {own:.3f} of the site's own positives, under the target "
                f"{target:g}",
            ),
        ]
    return [
        PairedCheck(
            "site_sensitivity_floor",
            at.low >= floor - 1e-12,
            at.low,
            floor,
            f"the candidate may detect as little as {at.low:.3f} here at "
            f"{CLAIM_CONFIDENCE:.0%} (floor {floor:.3f}; estimate {at.estimate:.3f}, {where})",
        ),
        PairedCheck(
            "site_sensitivity_target",
            at.estimate >= target - 1e-12,
            at.estimate,
            target,
            f"the candidate's estimated sensitivity here, {at.estimate:.3f}, is under the "
            f"target {target:g} ({where})",
        ),
    ]


def judge(
    labels: np.ndarray,
    logits: np.ndarray,
    reference_positive_logits: np.ndarray | ReferencePositives,
    *,
    candidate_threshold: float,
    current_threshold: float,
    target_sensitivity: float,
    margin: float,
    min_specificity_gain: float = MIN_SPECIFICITY_GAIN,
    groups: np.ndarray | None = None,
    candidate_calls: np.ndarray | None = None,
    current_calls: np.ndarray | None = None,
) -> Judgement:
    """Candidate against current on the same labeled studies (see the module's docstring).
    ``candidate_calls`` and ``current_calls``: the decisions as each version makes them (its own
    probability threshold), where float rounding could differ from ``logit >= threshold``."""
    labels = np.asarray(labels).astype(int).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    candidate = (
        logits >= candidate_threshold if candidate_calls is None else np.asarray(candidate_calls)
    )
    current = logits >= current_threshold if current_calls is None else np.asarray(current_calls)
    positives, negatives = labels == 1, labels == 0
    direction = _direction(candidate_threshold, current_threshold)
    gains = _GAINS[direction]
    negative_studies = _study_count(_groups_of(groups, negatives), int(negatives.sum()))
    base = SiteSensitivity(
        logits[positives],
        reference_positive_logits,
        groups=_groups_of(groups, positives),
        current_threshold=current_threshold,
    )
    floor = target_sensitivity - margin
    own_candidate = float(candidate[positives].mean())
    own_current = float(current[positives].mean())
    lost = int((current[positives] & ~candidate[positives]).sum())
    expected_loss = base.expected_loss(current_threshold, candidate_threshold)
    loss_p = _loss_p_value(lost, int(positives.sum()), expected_loss)

    def verdict(scale: float) -> tuple[str, list[PairedCheck], list[str], tuple]:
        model = (
            base
            if scale == 1.0
            else SiteSensitivity(
                logits[positives], reference_positive_logits, shift=base.shift, scale=scale
            )
        )
        specificity = paired_difference(
            ~candidate[negatives],
            ~current[negatives],
            scale=scale,
            one_way=gains,
            studies=negative_studies,
        )
        worth = paired_difference(
            ~candidate[negatives],
            ~current[negatives],
            confidence=1 - 2 * (1 - WORTH_CONFIDENCE),
            scale=scale,
            one_way=gains,
            studies=negative_studies,
        )
        sensitivity = paired_difference(
            candidate[positives],
            current[positives],
            scale=scale,
            one_way=-gains,
            studies=base.shift.n_site_studies,
        )
        cand, curr = model.at(candidate_threshold), model.at(current_threshold)
        evidence = (specificity, sensitivity, cand, curr, model)
        if direction == SAME:
            return "same", [], ["the candidate's threshold is the current one"], evidence
        checks = _sensitivity_checks(
            model, candidate_threshold, target_sensitivity, margin, repair=direction == LOWER
        )
        if direction == LOWER:
            if curr.estimate >= target_sensitivity:
                why = (
                    f"the current threshold already detects {curr.estimate:.3f} here (target "
                    f"{target_sensitivity:g}): a lower one would only cost specificity"
                )
                return "worse", checks, [why], evidence
            checks.insert(
                0,
                PairedCheck(
                    "site_current_below_target",
                    curr.high < target_sensitivity,
                    curr.high,
                    target_sensitivity,
                    f"the current threshold's sensitivity here ({curr.estimate:.3f}) is not "
                    f"shown below the target {target_sensitivity:g} (it may reach "
                    f"{curr.high:.3f})",
                ),
            )
        else:
            if cand.high < floor:
                why = f"the candidate detects at most {cand.high:.3f} here, below {floor:.3f}"
                return "worse", checks, [why], evidence
            checks.append(
                PairedCheck(
                    "site_own_positives",
                    own_candidate >= floor - 1e-12,
                    own_candidate,
                    floor,
                    f"the candidate detects {own_candidate:.3f} of the site's own positives "
                    f"({own_current:.3f} now), below {floor:.3f}",
                )
            )
            if model.borrowed:
                checks.append(
                    PairedCheck(
                        "site_positives_lost",
                        loss_p >= TAIL_ALPHA,
                        loss_p,
                        TAIL_ALPHA,
                        f"the candidate loses {lost} of the site's {int(positives.sum())} "
                        "positives, more than the moved validation positives allow "
                        f"({expected_loss:.3f} of them; p = {loss_p:.3f})",
                    )
                )
            checks.append(
                PairedCheck(
                    "site_specificity_gain",
                    worth.low >= min_specificity_gain - 1e-12,
                    worth.low,
                    min_specificity_gain,
                    f"specificity gain not shown worth a version: {worth.difference:+.3f} on "
                    f"{int(negatives.sum())} negatives ({negative_studies} studies; at least "
                    f"{worth.low:+.3f} at {WORTH_CONFIDENCE:.0%}, {min_specificity_gain:+.3f} "
                    "wanted)",
                )
            )
        reasons = [check.reason for check in checks if not check.passed]
        return ("undecided" if reasons else "better"), checks, reasons, evidence

    result, checks, reasons, (specificity, sensitivity, cand, curr, model) = verdict(1.0)
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
        min_specificity_gain=min_specificity_gain,
        checks=tuple(checks),
        reasons=tuple(reasons),
        candidate_own_sensitivity=own_candidate,
        current_own_sensitivity=own_current,
        expected_loss=expected_loss,
        loss_p_value=loss_p,
        labels_to_decide=needed,
    )

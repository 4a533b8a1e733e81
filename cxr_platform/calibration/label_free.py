"""What a site's traffic says about the model's performance before (or without) its labels.

- **Confidence-based performance estimation** (CBPE, the idea NannyML ships): with calibrated
  probabilities, each image called PNEUMONIA is a true positive with its probability, each one
  called NORMAL a false negative with its probability, and so on; the expected confusion matrix
  gives sensitivity, specificity and prevalence without a label. It is exactly as good as the
  calibration, which an acquisition shift breaks.
- **Refitted CBPE**: the same, on probabilities Platt-refitted on the labels a site has given,
  so it holds where the version's calibration no longer does (the logits are still ranked).
- **The adjusted count** (Forman 2008; black-box shift estimation for two classes, Lipton et al.
  2018): the positive rate the site's traffic is called at, corrected by the site's own
  confusion matrix, ``(q - fpr) / (tpr - fpr)``. It does not assume the calibration holds, only
  that each class looks at the site as it did in the site's labels.

:func:`trusted_estimate` says which one a drift window should believe and why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cxr_platform.calibration.prevalence import reweighted
from cxr_platform.model_version.operating_point import calibrated_probabilities
from cxr_platform.models.evaluation import fit_platt

MIN_SEPARATION = 0.1  # tpr - fpr below this: the adjusted count divides by noise
# Platt scaling fits two parameters: with fewer labels of a class than this, the refit follows
# the few it has wherever they lie.
MIN_REFIT_PER_CLASS = 10
BOOTSTRAP = 200


@dataclass(frozen=True)
class PerformanceEstimate:
    sensitivity: float | None
    specificity: float | None
    prevalence: float
    method: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def confidence_based_estimate(
    probabilities: np.ndarray,
    threshold: float,
    *,
    logits: np.ndarray | None = None,
    labeled_logits: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    prior: tuple[float, float] | None = None,
) -> PerformanceEstimate:
    """CBPE at ``threshold``; decisions are always the version's (``probabilities >=
    threshold``). ``prior``: (the prevalence the calibration was fitted under, the site's), to
    move the posteriors to the site's prevalence first: a calibration holds only at the
    prevalence it was fitted at. With ``labels`` of ``labeled_logits`` (the site's labeled
    rows, same version), the expected confusion matrix uses the traffic's ``logits``
    Platt-refitted on them instead."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    called = probabilities >= threshold
    method = "cbpe"
    trusted = probabilities
    if prior is not None and labels is None:
        trusted = reweighted(probabilities, *prior)
        method = f"cbpe at prevalence {prior[1]:.3f}"
    if labels is not None:
        if logits is None or labeled_logits is None:
            raise ValueError("refitting needs the traffic's logits and the labeled rows' logits")
        temperature, bias = fit_platt(
            np.asarray(labeled_logits, dtype=np.float64), np.asarray(labels).astype(int)
        )
        trusted = calibrated_probabilities(np.asarray(logits, dtype=np.float64), temperature, bias)
        method = "cbpe, Platt refitted on the site's labels"
    true_positive = float(trusted[called].sum())
    false_negative = float(trusted[~called].sum())
    true_negative = float((1 - trusted[~called]).sum())
    false_positive = float((1 - trusted[called]).sum())
    positives, negatives = true_positive + false_negative, true_negative + false_positive
    return PerformanceEstimate(
        sensitivity=true_positive / positives if positives > 0 else None,
        specificity=true_negative / negatives if negatives > 0 else None,
        prevalence=float(trusted.mean()) if trusted.size else 0.0,
        method=method,
        n=int(probabilities.size),
    )


@dataclass(frozen=True)
class AdjustedCount:
    prevalence: float | None  # None: the site's labels do not separate the classes enough
    low: float | None
    high: float | None
    positive_rate: float
    tpr: float
    fpr: float
    n: int
    n_labeled: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _adjusted(rate: float, tpr: float, fpr: float) -> float | None:
    if tpr - fpr < MIN_SEPARATION:
        return None
    return float(np.clip((rate - fpr) / (tpr - fpr), 0.0, 1.0))


def adjusted_count_prevalence(
    called: np.ndarray, labels: np.ndarray, labeled_called: np.ndarray, *, seed: int = 0
) -> AdjustedCount:
    """Prevalence of the traffic ``called`` from the site's confusion matrix (its labeled rows'
    ``labels`` and ``labeled_called``). The interval resamples both the traffic and the labels
    (90%, percentile bootstrap)."""
    called = np.asarray(called, dtype=bool)
    labels = np.asarray(labels).astype(int)
    labeled_called = np.asarray(labeled_called, dtype=bool)
    rate = float(called.mean())
    if not ((labels == 1).any() and (labels == 0).any()):
        raise ValueError("the adjusted count needs labels of both classes")
    tpr = float(labeled_called[labels == 1].mean())
    fpr = float(labeled_called[labels == 0].mean())
    estimate = _adjusted(rate, tpr, fpr)
    low = high = None
    if estimate is not None:
        rng = np.random.default_rng(seed)
        positives, negatives = labeled_called[labels == 1], labeled_called[labels == 0]
        draws = []
        for _ in range(BOOTSTRAP):
            value = _adjusted(
                float(rng.choice(called, called.size).mean()),
                float(rng.choice(positives, positives.size).mean()),
                float(rng.choice(negatives, negatives.size).mean()),
            )
            if value is not None:
                draws.append(value)
        if draws:
            low, high = float(np.quantile(draws, 0.05)), float(np.quantile(draws, 0.95))
    return AdjustedCount(estimate, low, high, rate, tpr, fpr, int(called.size), int(labels.size))


@dataclass(frozen=True)
class TrustedEstimate:
    """The label-free figures a window reports, and which it believes."""

    cbpe: PerformanceEstimate
    em_prevalence: float | None
    adjusted: AdjustedCount | None
    refitted: PerformanceEstimate | None
    # which: "cbpe", "refitted cbpe and adjusted count", "refitted cbpe", or "none"
    trusted: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "cbpe": self.cbpe.to_dict(),
            "em_prevalence": self.em_prevalence,
            "adjusted_count": None if self.adjusted is None else self.adjusted.to_dict(),
            "refitted_cbpe": None if self.refitted is None else self.refitted.to_dict(),
            "trusted": self.trusted,
            "why": self.why,
        }


@dataclass(frozen=True)
class SiteLabels:
    """A site's labeled rows scored by the same version: the logits, truths and the calls the
    version made on them."""

    logits: np.ndarray
    labels: np.ndarray
    called: np.ndarray

    @property
    def usable(self) -> bool:
        """Enough of each class to refit a calibration on."""
        positives = int(np.sum(self.labels))
        return min(positives, len(self.labels) - positives) >= MIN_REFIT_PER_CLASS


def trusted_estimate(
    probabilities: np.ndarray,
    threshold: float,
    *,
    logits: np.ndarray,
    em_prevalence: float | None,
    calibration_suspect: bool,
    training_prevalence: float | None = None,
    site_labels: SiteLabels | None = None,
    min_labeled: int = 30,
) -> TrustedEstimate:
    """CBPE (at the EM prevalence, given the prevalence the calibration was fitted under) and
    EM always; with at least ``min_labeled`` of the site's labels, ``MIN_REFIT_PER_CLASS`` of
    each class among them, the refitted CBPE and, where the calls separate the classes, the
    adjusted count too. ``calibration_suspect``: the window's input or prediction drift fired,
    so the version's calibration may not hold."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    prior = (
        (training_prevalence, em_prevalence)
        if training_prevalence is not None and em_prevalence is not None
        else None
    )
    cbpe = confidence_based_estimate(probabilities, threshold, prior=prior)
    adjusted = refitted = None
    if site_labels is not None and site_labels.usable and len(site_labels.labels) >= min_labeled:
        refitted = confidence_based_estimate(
            probabilities,
            threshold,
            logits=logits,
            labeled_logits=site_labels.logits,
            labels=site_labels.labels,
        )
        adjusted = adjusted_count_prevalence(
            probabilities >= threshold, site_labels.labels, site_labels.called
        )
        if adjusted.prevalence is not None:
            trusted = "refitted cbpe and adjusted count"
            why = (
                f"{len(site_labels.labels)} labels of this site scored by this version fix its "
                "calibration here and its confusion matrix, which CBPE and EM cannot check"
            )
        else:
            trusted = "refitted cbpe"
            why = (
                f"{len(site_labels.labels)} labels of this site scored by this version fix its "
                f"calibration here; the adjusted count cannot be made (the version's calls "
                f"separate the classes by {adjusted.tpr - adjusted.fpr:.2f} there, under "
                f"{MIN_SEPARATION:g})"
            )
    elif calibration_suspect:
        trusted = "none"
        why = (
            "the window's inputs or scores drifted, so the version's calibration may not hold "
            "here and CBPE and EM are only as good as it; label at least "
            f"{min_labeled} of this site's studies for estimates that do not assume it"
        )
    else:
        trusted = "cbpe"
        why = "no drift in inputs or scores: the version's calibration is taken to hold"
    return TrustedEstimate(cbpe, em_prevalence, adjusted, refitted, trusted, why)

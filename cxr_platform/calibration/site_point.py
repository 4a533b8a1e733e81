"""A site's operating point from its labels, proposed and judged by :mod:`.paired`: the one
computation ``cxr recalibrate``, the Dagster job, the re-judgement after a production move and
``benchmarks/site_recalibration.py`` share.

The proposal reads the site's positives only (where its sensitivity lies); the negatives, which
it never reads, judge what it buys. None of the positives is held out: the sensitivity bounds
fall as the threshold rises, so a bound that holds at each fixed threshold also holds at the
highest threshold it allows, picked from the same positives (the argument is in
:mod:`.paired`'s docstring); a split would only halve what they can show.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cxr_platform.calibration.paired import (
    MIN_SPECIFICITY_GAIN,
    SAME,
    SCALES,
    Judgement,
    PositiveShift,
    Proposal,
    ReferencePositives,
    judge,
    propose,
)
from cxr_platform.calibration.refit import (
    NotEnoughLabelsError,
    logits_from_probabilities,
)
from cxr_platform.model_version.operating_point import OperatingPoint, calibrated_probabilities
from cxr_platform.models.evaluation import fit_platt

# Fewest positive studies before a shift is worth estimating: far below the 59 an absolute
# certification needs, since the validation positives carry the shape and the site's only its
# position.
MIN_POSITIVE_STUDIES = 15
# Platt scaling is refitted for the site's probabilities only with this many of each class;
# the decisions do not depend on it.
MIN_PLATT_PER_CLASS = 20
RULE = "site_paired"


def logit_threshold(point: OperatingPoint) -> float:
    """The operating point's threshold in the version's logit units."""
    return float(logits_from_probabilities(np.array([point.threshold]), point)[0])


def calls(point: OperatingPoint, logits: np.ndarray) -> np.ndarray:
    """The decisions a version with this operating point makes, as it makes them."""
    return point.probabilities(np.asarray(logits, dtype=np.float64)) >= point.threshold


@dataclass(frozen=True)
class SiteEvidence:
    proposal: Proposal
    operating_point: OperatingPoint  # the candidate's
    judgement: Judgement
    n_positive: int
    n_positive_studies: int
    n_negative: int

    @property
    def passed(self) -> bool:
        return self.judgement.passed

    @property
    def labels_to_decide(self) -> dict[str, int] | None:
        return self.judgement.labels_to_decide

    def to_dict(self) -> dict[str, Any]:
        return {
            "proposal": self.proposal.to_dict(),
            "operating_point": self.operating_point.to_dict(),
            "judgement": self.judgement.to_dict(),
            "labels": {
                "PNEUMONIA": self.n_positive,
                "PNEUMONIA_studies": self.n_positive_studies,
                "NORMAL": self.n_negative,
            },
        }


def labels_missing(labels: np.ndarray, groups: np.ndarray, min_negatives: int) -> dict[str, int]:
    """More labels of each class before a site's threshold can be proposed and judged."""
    return {
        "PNEUMONIA": max(0, MIN_POSITIVE_STUDIES - len(np.unique(groups[labels == 1]))),
        "NORMAL": max(0, min_negatives - int((labels == 0).sum())),
    }


def require_labels(labels: np.ndarray, groups: np.ndarray, min_negatives: int) -> None:
    """Raises :class:`NotEnoughLabelsError`, with how many more of each class, below the
    minimums."""
    missing = labels_missing(labels, groups, min_negatives)
    if any(missing.values()):
        raise NotEnoughLabelsError(
            f"{int((labels == 1).sum())} PNEUMONIA labels "
            f"({len(np.unique(groups[labels == 1]))} studies) and {int((labels == 0).sum())} "
            f"NORMAL labels: proposing a threshold and judging it takes {MIN_POSITIVE_STUDIES} "
            f"positive studies and {min_negatives} negatives; "
            + ", ".join(f"{n} more {name}" for name, n in missing.items() if n)
            + " needed",
            missing,
        )


def site_operating_point(
    labels: np.ndarray,
    logits: np.ndarray,
    groups: np.ndarray,
    reference_positive_logits: np.ndarray | ReferencePositives,
    current: OperatingPoint,
    *,
    target_sensitivity: float,
    margin: float,
    min_negatives: int,
    min_specificity_gain: float = MIN_SPECIFICITY_GAIN,
    current_calls: np.ndarray | None = None,
) -> SiteEvidence:
    """Propose a threshold from the site's positives and judge it, paired against ``current``.
    ``current_calls``: the current version's logged decisions (default: recomputed from its
    operating point). Raises :class:`NotEnoughLabelsError` below the minimums, with how many
    more of each class."""
    labels = np.asarray(labels).astype(int).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    groups = np.asarray(groups).astype(str)
    require_labels(labels, groups, min_negatives)
    current_threshold = logit_threshold(current)

    def proposal_at(scale: float, shift: PositiveShift | None = None) -> Proposal:
        return propose(
            labels,
            logits,
            reference_positive_logits,
            current_threshold,
            target_sensitivity=target_sensitivity,
            margin=margin,
            groups=groups,
            scale=scale,
            shift=shift,
        )

    proposal = proposal_at(1.0)
    point = candidate_point(labels, logits, current, proposal, target_sensitivity)
    logged = calls(current, logits) if current_calls is None else np.asarray(current_calls)
    judgement = judge(
        labels,
        logits,
        reference_positive_logits,
        candidate_threshold=proposal.threshold,
        current_threshold=current_threshold,
        target_sensitivity=target_sensitivity,
        margin=margin,
        min_specificity_gain=min_specificity_gain,
        groups=groups,
        candidate_calls=calls(point, logits) if proposal.direction != SAME else logged,
        current_calls=logged,
    )
    if proposal.direction == SAME:
        judgement = replace(
            judgement,
            labels_to_decide=_labels_to_move(
                lambda scale: proposal_at(scale, proposal.shift), labels
            ),
        )
    return SiteEvidence(
        proposal,
        point,
        judgement,
        int((labels == 1).sum()),
        len(np.unique(groups[labels == 1])),
        int((labels == 0).sum()),
    )


def _labels_to_move(proposal_at, labels: np.ndarray) -> dict[str, int] | None:
    """No threshold other than the current one is shown safe: how many more labels, at the same
    rates, would let one be proposed (none: the current one is where the evidence puts it)."""
    for scale in SCALES:
        moved = proposal_at(scale)
        if moved.direction != SAME and moved.expected_specificity_gain.difference != 0:
            return {
                "PNEUMONIA": int(np.ceil((labels == 1).sum() * (scale - 1))),
                "NORMAL": int(np.ceil((labels == 0).sum() * (scale - 1))),
            }
    return None


def candidate_point(
    labels: np.ndarray,
    logits: np.ndarray,
    current: OperatingPoint,
    proposal: Proposal,
    target_sensitivity: float,
) -> OperatingPoint:
    """The proposal as an operating point: Platt refitted where the labels allow (so the
    site's probabilities mean what they say there), the threshold at the proposed logit."""
    temperature, bias = current.temperature, current.bias
    if min((labels == 1).sum(), (labels == 0).sum()) >= MIN_PLATT_PER_CLASS:
        temperature, bias = fit_platt(logits, labels)
    threshold = float(
        calibrated_probabilities(np.array([proposal.threshold]), temperature, bias)[0]
    )
    return OperatingPoint(
        threshold=threshold,
        temperature=temperature,
        rule=RULE,
        target_sensitivity=target_sensitivity,
        val_sensitivity=proposal.expected_sensitivity[0],
        val_specificity=float(
            np.mean(logits[labels == 0] < proposal.threshold) if (labels == 0).any() else 0.0
        ),
        bias=bias,
    )

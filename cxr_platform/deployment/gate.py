"""The promotion gate: one rule, used by the CLI, the Dagster assets and the retraining loop.

A candidate is compared with the current production model on the *same* evaluation data, each
at its own operating threshold:

- absolute floors, always: AUC, sensitivity and specificity at or above the configured floors
  (so the very first model is promoted only when it clears them);
- relative, when a production model exists: AUC not lower than production's by more than
  ``max_auc_drop``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_platform.errors import CxrError


class GateError(CxrError):
    pass


@dataclass(frozen=True)
class GateConfig:
    min_auc: float
    min_sensitivity: float
    min_specificity: float
    max_auc_drop: float = 0.01

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ModelScore:
    version: str | None
    n: int
    n_positive: int
    auc: float
    sensitivity: float
    specificity: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_predictions(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, *, version: str | None
) -> ModelScore:
    labels = np.asarray(labels).astype(int).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).ravel()
    if set(np.unique(labels)) != {0, 1}:
        raise GateError("the gate's evaluation data must contain both classes")
    predicted = probabilities >= threshold
    positives = labels == 1
    return ModelScore(
        version=version,
        n=len(labels),
        n_positive=int(positives.sum()),
        auc=float(roc_auc_score(labels, probabilities)),
        sensitivity=float(predicted[positives].mean()),
        specificity=float((~predicted[~positives]).mean()),
        threshold=float(threshold),
    )


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    value: float
    limit: float


@dataclass(frozen=True)
class GateDecision:
    candidate: ModelScore
    production: ModelScore | None
    config: GateConfig
    checks: tuple[GateCheck, ...]
    evaluated_on: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed_checks(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        parts = [
            f"{c.name} {c.value:.3f} {'>=' if c.passed else '<'} {c.limit:.3f}" for c in self.checks
        ]
        against = (
            f"production v{self.production.version}" if self.production else "no production model"
        )
        return f"{verdict}: candidate v{self.candidate.version} vs {against}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "candidate": self.candidate.to_dict(),
            "production": self.production.to_dict() if self.production else None,
            "config": self.config.to_dict(),
            "checks": [asdict(check) for check in self.checks],
            "evaluated_on": self.evaluated_on,
        }


def decide(
    candidate: ModelScore,
    production: ModelScore | None,
    config: GateConfig,
    *,
    evaluated_on: dict[str, Any] | None = None,
    extra_checks: Sequence[GateCheck] = (),
) -> GateDecision:
    """``extra_checks`` come from other evidence than the shared test split (live shadow
    traffic with feedback labels); they must pass too."""
    if production is not None and (production.n, production.n_positive) != (
        candidate.n,
        candidate.n_positive,
    ):
        raise GateError("candidate and production were not scored on the same evaluation data")
    checks = [
        GateCheck("auc_floor", candidate.auc >= config.min_auc, candidate.auc, config.min_auc),
        GateCheck(
            "sensitivity_floor",
            candidate.sensitivity >= config.min_sensitivity,
            candidate.sensitivity,
            config.min_sensitivity,
        ),
        GateCheck(
            "specificity_floor",
            candidate.specificity >= config.min_specificity,
            candidate.specificity,
            config.min_specificity,
        ),
    ]
    if production is not None:
        limit = production.auc - config.max_auc_drop
        # A tiny tolerance: identical models must pass a zero-delta gate despite float noise.
        checks.append(
            GateCheck("auc_vs_production", candidate.auc >= limit - 1e-12, candidate.auc, limit)
        )
    checks.extend(extra_checks)
    return GateDecision(
        candidate=candidate,
        production=production,
        config=config,
        checks=tuple(checks),
        evaluated_on=evaluated_on or {},
    )

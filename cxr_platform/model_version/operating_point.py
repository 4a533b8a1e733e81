"""The operating point a version decides with: Platt calibration and the decision threshold.

Numpy only: every scoring process reads it, and none of them should load scipy's optimizers or
scikit-learn to apply two numbers. Fitting it is :mod:`cxr_platform.models.evaluation`'s job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def calibrated_probabilities(
    logits: np.ndarray, temperature: float, bias: float = 0.0
) -> np.ndarray:
    """``sigmoid(logit / temperature + bias)``, written as ``exp(-log(1 + exp(-z)))`` so neither
    tail overflows."""
    z = np.asarray(logits, dtype=np.float64) / temperature + bias
    return np.exp(-np.logaddexp(0.0, -z))


@dataclass(frozen=True)
class OperatingPoint:
    """What a deployed model needs besides its weights: calibration and the decision threshold."""

    threshold: float  # on the calibrated probability; PNEUMONIA when probability >= threshold
    temperature: float
    rule: str
    target_sensitivity: float | None
    val_sensitivity: float
    val_specificity: float
    # Platt intercept: p = sigmoid(logit / temperature + bias). Training with pos_weight shifts the
    # logits' intercept, which a temperature alone cannot undo.
    bias: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OperatingPoint:
        return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return calibrated_probabilities(logits, self.temperature, self.bias)

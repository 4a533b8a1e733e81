"""What every site recalibration builds on: logits given back from logged probabilities, and the
typed errors of a recalibration.

The inference log keeps calibrated probabilities (as doubles), not logits; a probability and the
version's own Platt parameters give the logit back. A drift reference is stored as text to six
digits, which rounds a confident probability to 1; it keeps the logits beside them, and
:func:`reference_logits` reads those where they are. How a site's threshold
is proposed and judged is :mod:`cxr_platform.calibration.paired`; the label-free counterparts
are :mod:`cxr_platform.calibration.prevalence` and :mod:`cxr_platform.calibration.label_free`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import logit as log_odds

from cxr_platform.deployment.reference import LOGIT, PROBABILITY
from cxr_platform.errors import CxrError
from cxr_platform.model_version.operating_point import OperatingPoint

EDGE = 1e-12  # probabilities are clipped this far from 0 and 1 before taking log-odds


class RecalibrationError(CxrError):
    pass


class NotEnoughLabelsError(RecalibrationError):
    """Too few labels of a class to propose and judge a site's operating point."""

    def __init__(self, message: str, missing: dict[str, int]) -> None:
        super().__init__(message)
        self.missing = missing  # per class, how many more labels are needed


def logits_from_probabilities(
    probabilities: np.ndarray, operating_point: OperatingPoint
) -> np.ndarray:
    """Invert ``p = sigmoid(logit / T + b)``: the logits the version computed."""
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), EDGE, 1 - EDGE)
    return (log_odds(clipped) - operating_point.bias) * operating_point.temperature


def reference_logits(rows: pd.DataFrame, operating_point: OperatingPoint) -> np.ndarray:
    """The logits of scored drift-reference rows: stored ones where the reference keeps them,
    else given back from the probabilities (a reference exported before it kept them)."""
    if LOGIT in rows and rows[LOGIT].notna().all():
        return rows[LOGIT].to_numpy(dtype=np.float64)
    return logits_from_probabilities(rows[PROBABILITY].to_numpy(dtype=float), operating_point)

"""Subgroup results of an evaluation: how the model does on each part of the data the data
itself names (the folder an image came from, its file-name family, its projection).

A model that is right on average can be wrong on one scanner, one hospital's batch or one
projection; the overall figure hides it. Each subgroup gets sensitivity and specificity at the
version's operating point with patient-level 95% intervals, and is *flagged* when even the upper
end of its interval lies below the overall figure: the shortfall is then more than chance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_platform.data.imaging import read_dicom_header
from cxr_platform.data.patients import file_name_family
from cxr_platform.data.sources import source_folder
from cxr_platform.errors import ImageReadError
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.evaluation import (
    SplitEvaluation,
    cluster_bootstrap_intervals,
    mann_whitney_auc,
    threshold_metrics,
)

SOURCE_FOLDER = "source_folder"
FILE_FAMILY = "file_family"
PROJECTION = "projection"
OTHER = "(other)"  # groups too small to judge, pooled
JUDGED_RATES = ("sensitivity", "specificity")

_DICOM_SUFFIXES = {".dcm", ".dicom"}


def projection(path: str) -> str | None:
    """ViewPosition of a DICOM file (PA, AP, LL, ...); None where the file does not say."""
    if Path(path).suffix.lower() not in _DICOM_SUFFIXES:
        return None
    try:
        header = read_dicom_header(path)
    except ImageReadError:  # an unreadable header names no projection; the image was read before
        return None
    value = str(header.get("ViewPosition", "") or "").strip().upper()
    return value or None


def subgroup_columns(index: pd.DataFrame, *, min_images: int = 20) -> dict[str, np.ndarray]:
    """Per dimension, each image's group, from a cache index (``path``, ``relative_path``).

    Groups with fewer than ``min_images`` images are pooled as ``(other)``; a dimension with
    fewer than two groups left says nothing about subgroups and is left out.
    """
    relative = index["relative_path"].astype(str)
    candidates = {
        SOURCE_FOLDER: relative.map(source_folder),
        FILE_FAMILY: relative.map(file_name_family),
        PROJECTION: index["path"].astype(str).map(projection).fillna("(not recorded)"),
    }
    columns = {}
    for dimension, groups in candidates.items():
        counts = groups.value_counts()
        pooled = groups.where(groups.map(counts) >= min_images, OTHER)
        if pooled.nunique() >= 2 and (pooled != OTHER).any():
            columns[dimension] = pooled.to_numpy(dtype=str)
    return columns


@dataclass(frozen=True)
class SubgroupResult:
    split: str
    dimension: str
    group: str
    n: int
    n_positive: int
    n_patients: int
    auc: float | None
    sensitivity: float | None
    sensitivity_ci_low: float | None
    sensitivity_ci_high: float | None
    specificity: float | None
    specificity_ci_low: float | None
    specificity_ci_high: float | None
    # Which of sensitivity and specificity fall short of the whole split's figure by more than
    # chance (the upper end of the subgroup's interval is below it).
    flagged: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["flagged"] = list(self.flagged)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SubgroupResult:
        return cls(**{**values, "flagged": tuple(values.get("flagged") or ())})

    def describe(self) -> str:
        shortfalls = ", ".join(
            f"{rate} {getattr(self, rate):.3f} (95% CI "
            f"{getattr(self, f'{rate}_ci_low'):.3f}-{getattr(self, f'{rate}_ci_high'):.3f})"
            for rate in self.flagged
        )
        return f"{self.split} {self.dimension}={self.group} (n={self.n}): {shortfalls}"


def evaluate_subgroups(
    overall: SplitEvaluation,
    labels: np.ndarray,
    logits: np.ndarray,
    operating_point: OperatingPoint,
    columns: dict[str, np.ndarray],
    patients: np.ndarray | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> list[SubgroupResult]:
    labels = np.asarray(labels).astype(int).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    probabilities = operating_point.probabilities(logits)
    patients = np.arange(len(labels)).astype(str) if patients is None else np.asarray(patients, str)
    results = []
    for dimension, groups in columns.items():
        for group in sorted(set(groups)):
            members = np.flatnonzero(groups == group)
            truth, scores = labels[members], logits[members]
            metrics = threshold_metrics(truth, probabilities[members], operating_point.threshold)
            intervals = cluster_bootstrap_intervals(
                truth,
                scores,
                probabilities[members],
                operating_point.threshold,
                patients[members],
                n_bootstrap=n_bootstrap,
                seed=seed,
            )
            both = 0 < truth.sum() < len(truth)
            result = SubgroupResult(
                split=overall.split,
                dimension=dimension,
                group=group,
                n=len(members),
                n_positive=int(truth.sum()),
                n_patients=len(set(patients[members])),
                auc=mann_whitney_auc(scores[truth == 1], scores[truth == 0]) if both else None,
                sensitivity=metrics["sensitivity"],
                sensitivity_ci_low=intervals["sensitivity"][0],
                sensitivity_ci_high=intervals["sensitivity"][1],
                specificity=metrics["specificity"],
                specificity_ci_low=intervals["specificity"][0],
                specificity_ci_high=intervals["specificity"][1],
            )
            flagged = tuple(
                rate
                for rate in JUDGED_RATES
                if getattr(result, f"{rate}_ci_high") is not None
                and getattr(overall, rate) is not None
                and getattr(result, f"{rate}_ci_high") < getattr(overall, rate)
            )
            results.append(SubgroupResult(**{**asdict(result), "flagged": flagged}))
    return results

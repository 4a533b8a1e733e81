"""Medical evaluation: threshold and calibration chosen on validation, then applied to test.

Order matters and is enforced by the code path: validation logits -> temperature (NLL fit) ->
operating threshold on calibrated validation probabilities -> only then are test predictions
scored, with the threshold and temperature already frozen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from cxr_platform.errors import CxrError
from cxr_platform.model_version.operating_point import OperatingPoint, calibrated_probabilities
from cxr_platform.sections import THRESHOLD_RULES, ThresholdRuleName

if TYPE_CHECKING:
    from cxr_platform.models.subgroups import SubgroupResult


class EvaluationError(CxrError):
    pass


@dataclass(frozen=True)
class ThresholdRule:
    name: ThresholdRuleName = "sensitivity_target"
    target_sensitivity: float = 0.95

    def describe(self) -> str:
        if self.name == "youden":
            return "maximum Youden's J (sensitivity + specificity - 1) on validation"
        return (
            f"highest specificity with sensitivity >= {self.target_sensitivity:.2f} on validation"
        )


def _check_binary(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).astype(int).ravel()
    if set(np.unique(labels)) != {0, 1}:
        raise EvaluationError("evaluation needs both classes (0 = normal, 1 = pneumonia)")
    return labels


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T > 0 minimizing the NLL of ``sigmoid(logit / T)`` (Guo et al. 2017)."""
    labels = _check_binary(labels)
    logits = np.asarray(logits, dtype=np.float64)

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        # log(1 + exp(-|z|)) + max(z, 0) - y z: stable binary cross-entropy on logits
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(temperature, bias) minimizing the NLL of ``sigmoid(logit / T + b)`` (Platt scaling).

    Parameterized as a scale and an intercept on the logit, with the scale kept positive so the
    ranking (and with it the AUC) never changes.
    """
    labels = _check_binary(labels)
    logits = np.asarray(logits, dtype=np.float64)

    def nll(params: np.ndarray) -> float:
        z = logits * math.exp(-params[0]) + params[1]
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))

    start = np.array([math.log(fit_temperature(logits, labels)), 0.0])
    bounds = [(math.log(0.05), math.log(20.0)), (-10.0, 10.0)]
    result = minimize(nll, start, method="L-BFGS-B", bounds=bounds)
    return float(math.exp(result.x[0])), float(result.x[1])


def choose_threshold(
    labels: np.ndarray, probabilities: np.ndarray, rule: ThresholdRule = ThresholdRule()
) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) on the data given, which must be validation data.

    Candidates are the distinct scores (``roc_curve`` without point dropping), so the chosen
    threshold reproduces its validation sensitivity exactly under ``score >= threshold``.
    """
    labels = _check_binary(labels)
    fpr, tpr, thresholds = roc_curve(labels, probabilities, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule.name == "youden":
        index = int(np.argmax(tpr - fpr))  # first maximum = highest threshold among ties
    elif rule.name == "sensitivity_target":
        # Thresholds descend, so fpr only grows: the first point reaching the target sensitivity
        # has the highest specificity of all that reach it.
        index = int(np.argmax(tpr >= rule.target_sensitivity - 1e-12))
    else:
        raise EvaluationError(
            f"unknown threshold rule {rule.name!r}; choose from {THRESHOLD_RULES}"
        )
    return float(thresholds[index]), float(tpr[index]), float(1.0 - fpr[index])


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def threshold_metrics(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float
) -> dict[str, Any]:
    labels = np.asarray(labels).astype(int).ravel()
    predicted = (np.asarray(probabilities) >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    sensitivity = _ratio(tp, tp + fn)
    ppv = _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "accuracy": (tp + tn) / len(labels),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "f1": f1,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


def bootstrap_auc_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of ROC AUC, resampling positives and negatives separately (stratified) so
    every replicate keeps the observed prevalence and both classes."""
    labels = _check_binary(labels)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    rng = np.random.default_rng(seed)
    pos = positives[rng.integers(0, len(positives), (n_bootstrap, len(positives)))]
    neg = negatives[rng.integers(0, len(negatives), (n_bootstrap, len(negatives)))]
    # AUC = P(score_pos > score_neg) + 0.5 P(tie), computed per replicate by ranking within it.
    aucs = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        aucs[b] = mann_whitney_auc(pos[b], neg[b])
    alpha = (1 - confidence) / 2
    return float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1 - alpha))


INTERVAL_METRICS = ("auc", "sensitivity", "specificity", "ppv", "npv")


def patient_resamples(
    labels: np.ndarray, groups: np.ndarray, n_bootstrap: int, *, seed: int = 0
) -> Iterator[np.ndarray]:
    """``n_bootstrap`` index arrays, each whole groups (patients) drawn with replacement,
    separately per class (a group's class is that of its first image), so every replicate
    keeps the classes the data has."""
    labels = np.asarray(labels).astype(int).ravel()
    _, group_index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    members = [np.flatnonzero(group_index == g) for g in range(group_index.max() + 1)]
    by_class = {cls: [m for m in members if labels[m[0]] == cls] for cls in (0, 1)}
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        yield np.concatenate(
            [
                np.concatenate([pool[i] for i in rng.integers(0, len(pool), len(pool))])
                for pool in by_class.values()
                if pool
            ]
        )


def best_specificity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The most specificity any threshold gives on these images at sensitivity >= ``target``:
    the ceiling of the ranking, whatever threshold a version uses."""
    positives = np.sort(scores[labels == 1])[::-1]
    threshold = positives[int(np.ceil(target * len(positives))) - 1]
    return float((scores[labels == 0] < threshold).mean())


def cluster_bootstrap_intervals(
    labels: np.ndarray,
    scores: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    groups: np.ndarray | None = None,
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile intervals of AUC and of sensitivity, specificity, PPV and NPV at
    ``threshold``, resampling whole groups (patients) with replacement.

    Images of one patient are not independent, so resampling images would make the intervals
    too narrow wherever patients have several. Groups are drawn separately per class (a
    group's class is that of its first image; a patient has one diagnosis) so every replicate
    keeps both. Without ``groups`` every image is its own group. With one class only (a
    subgroup of normal images), AUC and the rates of the other class have no interval.
    """
    labels = np.asarray(labels).astype(int).ravel()
    if not set(np.unique(labels)) <= {0, 1}:
        raise EvaluationError("labels must be 0 (normal) or 1 (pneumonia)")
    scores = np.asarray(scores, dtype=np.float64)
    predicted = np.asarray(probabilities, dtype=np.float64) >= threshold
    if groups is None:
        groups = np.arange(len(labels))
    draws: dict[str, list[float]] = {name: [] for name in INTERVAL_METRICS}
    for chosen in patient_resamples(labels, groups, n_bootstrap, seed=seed):
        truth, scored, called = labels[chosen], scores[chosen], predicted[chosen]
        positives, negatives = truth == 1, truth == 0
        if positives.any() and negatives.any():
            draws["auc"].append(mann_whitney_auc(scored[positives], scored[negatives]))
        tp, fn = int(called[positives].sum()), int((~called[positives]).sum())
        tn, fp = int((~called[negatives]).sum()), int(called[negatives].sum())
        for name, value in (
            ("sensitivity", _ratio(tp, tp + fn)),
            ("specificity", _ratio(tn, tn + fp)),
            ("ppv", _ratio(tp, tp + fp)),
            ("npv", _ratio(tn, tn + fn)),
        ):
            if value is not None:
                draws[name].append(value)
    alpha = (1 - confidence) / 2
    return {
        name: (
            (float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)))
            if values
            else (None, None)
        )
        for name, values in draws.items()
    }


def mann_whitney_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    negatives = np.sort(negatives)
    below = np.searchsorted(negatives, positives, side="left")
    below_or_equal = np.searchsorted(negatives, positives, side="right")
    return float((below + below_or_equal).sum() / (2.0 * len(positives) * len(negatives)))


def reliability_curve(
    labels: np.ndarray, probabilities: np.ndarray, *, n_bins: int = 15
) -> list[tuple[float, float, int]]:
    """(mean predicted, observed rate, count) per non-empty equal-width bin of the pneumonia
    probability: the points of the reliability plot."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).ravel()
    bins = np.clip((probabilities * n_bins).astype(int), 0, n_bins - 1)
    return [
        (float(probabilities[in_bin].mean()), float(labels[in_bin].mean()), int(in_bin.sum()))
        for in_bin in (bins == b for b in range(n_bins))
        if in_bin.any()
    ]


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, *, n_bins: int = 15
) -> float:
    """Count-weighted |observed rate - mean probability| over the reliability curve's bins."""
    curve = reliability_curve(labels, probabilities, n_bins=n_bins)
    total = sum(count for _, _, count in curve)
    return float(sum(count * abs(observed - mean) for mean, observed, count in curve) / total)


@dataclass
class SplitEvaluation:
    split: str
    n: int
    n_positive: int
    auc: float
    auc_ci_low: float
    auc_ci_high: float
    ece_uncalibrated: float
    ece: float  # after Platt scaling
    accuracy: float
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    f1: float | None
    tn: int
    fp: int
    fn: int
    tp: int
    # 95% intervals at the operating point; resampled by patient where ``interval_unit`` says so.
    sensitivity_ci_low: float | None = None
    sensitivity_ci_high: float | None = None
    specificity_ci_low: float | None = None
    specificity_ci_high: float | None = None
    ppv_ci_low: float | None = None
    ppv_ci_high: float | None = None
    npv_ci_low: float | None = None
    npv_ci_high: float | None = None
    n_patients: int | None = None
    interval_unit: str = "image"  # "patient": whole patients were resampled


def evaluate_split(
    split: str,
    labels: np.ndarray,
    logits: np.ndarray,
    operating_point: OperatingPoint,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    patients: np.ndarray | None = None,
) -> SplitEvaluation:
    """``patients``: each image's patient id, so intervals resample patients, not images."""
    labels = _check_binary(labels)
    probabilities = operating_point.probabilities(logits)
    intervals = cluster_bootstrap_intervals(
        labels,
        logits,
        probabilities,
        operating_point.threshold,
        patients,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    bounds = {
        f"{name}_ci_{side}": value
        for name, (low, high) in intervals.items()
        for side, value in (("low", low), ("high", high))
    }
    return SplitEvaluation(
        split=split,
        n=len(labels),
        n_positive=int(labels.sum()),
        auc=float(roc_auc_score(labels, logits)),
        ece_uncalibrated=expected_calibration_error(labels, calibrated_probabilities(logits, 1.0)),
        ece=expected_calibration_error(labels, probabilities),
        **threshold_metrics(labels, probabilities, operating_point.threshold),
        **bounds,
        n_patients=None if patients is None else len(np.unique(np.asarray(patients).astype(str))),
        interval_unit="image" if patients is None else "patient",
    )


def fit_operating_point(
    val_labels: np.ndarray, val_logits: np.ndarray, rule: ThresholdRule = ThresholdRule()
) -> OperatingPoint:
    """Calibration (Platt) and threshold, from validation predictions only."""
    temperature, bias = fit_platt(val_logits, val_labels)
    threshold, sensitivity, specificity = choose_threshold(
        val_labels, calibrated_probabilities(val_logits, temperature, bias), rule
    )
    return OperatingPoint(
        threshold=threshold,
        temperature=temperature,
        rule=rule.name,
        target_sensitivity=rule.target_sensitivity if rule.name == "sensitivity_target" else None,
        val_sensitivity=sensitivity,
        val_specificity=specificity,
        bias=bias,
    )


# The 95% interval fields of a split, as SplitEvaluation names them.
INTERVAL_FIELDS = tuple(
    f"{name}_ci_{side}" for name in INTERVAL_METRICS for side in ("low", "high")
)
# Per split, the figures copied onto a registry version (cxr.metric.* tags) and model files.
VERSION_METRIC_KEYS = {
    "test": ("auc", "sensitivity", "specificity", "ppv", "npv", "ece", *INTERVAL_FIELDS),
    "val": ("sensitivity", "specificity"),
}


@dataclass
class EvaluationReport:
    arch: str
    model_name: str
    operating_point: OperatingPoint
    splits: dict[str, SplitEvaluation]
    training: dict[str, Any] = field(default_factory=dict)
    # Which file was evaluated: export refuses a report that is about another checkpoint.
    checkpoint_sha256: str | None = None
    # Where the data names parts of itself (folders, file-name families, projections).
    subgroups: list[SubgroupResult] = field(default_factory=list)
    # Kept for plots; not written to JSON (one number per image would bloat the report).
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def headline(self, split: str = "test") -> dict[str, Any]:
        s = self.splits[split]
        return {
            "auc": s.auc,
            "auc_ci_low": s.auc_ci_low,
            "auc_ci_high": s.auc_ci_high,
            "accuracy": s.accuracy,
            "sensitivity": s.sensitivity,
            "sensitivity_ci_low": s.sensitivity_ci_low,
            "sensitivity_ci_high": s.sensitivity_ci_high,
            "specificity": s.specificity,
            "specificity_ci_low": s.specificity_ci_low,
            "specificity_ci_high": s.specificity_ci_high,
            "ppv": s.ppv,
            "ppv_ci_low": s.ppv_ci_low,
            "ppv_ci_high": s.ppv_ci_high,
            "npv": s.npv,
            "npv_ci_low": s.npv_ci_low,
            "npv_ci_high": s.npv_ci_high,
            "interval_unit": s.interval_unit,
            "f1": s.f1,
            "ece": s.ece,
            "threshold": self.operating_point.threshold,
            f"n_{split}": s.n,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "model_name": self.model_name,
            "operating_point": self.operating_point.to_dict(),
            "splits": {name: asdict(s) for name, s in self.splits.items()},
            "training": self.training,
            "checkpoint_sha256": self.checkpoint_sha256,
            "subgroups": [subgroup.to_dict() for subgroup in self.subgroups],
        }

    @property
    def flagged_subgroups(self) -> list[SubgroupResult]:
        return [subgroup for subgroup in self.subgroups if subgroup.flagged]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvaluationReport:
        from cxr_platform.models.subgroups import SubgroupResult

        try:
            return cls(
                arch=values["arch"],
                model_name=values["model_name"],
                operating_point=OperatingPoint.from_dict(values["operating_point"]),
                splits={name: SplitEvaluation(**split) for name, split in values["splits"].items()},
                training=dict(values.get("training") or {}),
                checkpoint_sha256=values.get("checkpoint_sha256"),
                subgroups=[SubgroupResult.from_dict(v) for v in values.get("subgroups") or []],
            )
        except (KeyError, TypeError) as error:
            raise EvaluationError(f"not an evaluation report: {error!r}") from error

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read_json(cls, path: str | Path) -> EvaluationReport:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise EvaluationError(f"{path}: cannot read an evaluation report: {error}") from error
        return cls.from_dict(values)

    def version_metrics(self) -> dict[str, float]:
        """The headline figures a registry version and its model files carry."""
        metrics: dict[str, Any] = {"best_val_auc": self.training.get("best_val_auc")}
        for split, keys in VERSION_METRIC_KEYS.items():
            if split in self.splits:
                evaluation = self.splits[split]
                metrics.update({f"{split}_{key}": getattr(evaluation, key) for key in keys})
        return {key: float(value) for key, value in metrics.items() if value is not None}


def evaluate_predictions(
    *,
    arch: str,
    model_name: str,
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    rule: ThresholdRule = ThresholdRule(),
    n_bootstrap: int = 2000,
    seed: int = 0,
    training: dict[str, Any] | None = None,
    patients: dict[str, np.ndarray] | None = None,
) -> EvaluationReport:
    """``val`` and ``test`` are (labels, logits). The operating point is fixed before test.
    ``patients``: per split, each image's patient id (intervals then resample patients)."""
    patients = patients or {}
    val_labels, val_logits = val
    operating_point = fit_operating_point(val_labels, val_logits, rule)
    splits = {
        "val": evaluate_split(
            "val",
            val_labels,
            val_logits,
            operating_point,
            n_bootstrap=n_bootstrap,
            seed=seed,
            patients=patients.get("val"),
        )
    }
    predictions = {"val": (np.asarray(val_labels), np.asarray(val_logits))}
    if test is not None:
        test_labels, test_logits = test
        splits["test"] = evaluate_split(
            "test",
            test_labels,
            test_logits,
            operating_point,
            n_bootstrap=n_bootstrap,
            seed=seed,
            patients=patients.get("test"),
        )
        predictions["test"] = (np.asarray(test_labels), np.asarray(test_logits))
    return EvaluationReport(
        arch=arch,
        model_name=model_name,
        operating_point=operating_point,
        splits=splits,
        training=training or {},
        predictions=predictions,
    )

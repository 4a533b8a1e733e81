"""Drift of one window of logged inference records against a model version's reference.

Three signals, each with its own threshold (:class:`DriftRule`), computed with Evidently:

- input drift: the share of image features whose distribution differs from the reference
  (two-sample K-S test per feature; chi-square for the photometric interpretation). Content
  features (intensity statistics on the model input) are compared over the whole window;
  acquisition features (original size, bit depth, photometric interpretation) per kind of
  traffic, DICOM or image files, and per site where the log names sites, each against the
  reference rows of its own kind: a DICOM instance carries the detector's matrix where a PNG
  export does not, so comparing the two would call every PACS an outlier;
- prediction drift: the calibrated probability's distribution (K-S) and the positive rate;
- performance drift: where feedback labels exist, AUC, sensitivity and specificity at the
  version's threshold against the version's own test-split figures, allowing for the uncertainty
  of both (a live window has no patient ids; images of one study are resampled together);
- refusal drift: the input gate refusing more than it should.

Where the log names sites, performance and refusals are also judged per site, and the report
says which site failed on what.

The rule fires when any signal crosses its threshold. Defaults were chosen on in-distribution
windows (see ``benchmarks/drift_detection.py``): K-S p-values of clustered image data (several
images per patient) are optimistic, so a single drifting feature is not enough.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from cxr_platform.calibration.label_free import SiteLabels, TrustedEstimate, trusted_estimate
from cxr_platform.calibration.prevalence import estimate_prevalence
from cxr_platform.calibration.refit import logits_from_probabilities
from cxr_platform.deployment.reference import (
    ACQUISITION_CATEGORIES,
    ACQUISITION_FEATURES,
    CONTENT_FEATURES,
    PREDICTED,
    PROBABILITY,
    REFERENCE_FLOAT_FORMAT,
    SOURCE_FORMAT,
    acquisition_source,
)
from cxr_platform.errors import CxrError
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.evaluation import cluster_bootstrap_intervals


class DriftError(CxrError):
    pass


WINDOW_BOOTSTRAP = 1000  # replicates for a window's intervals (a few hundred labeled rows)
# A kind of traffic with fewer rows in a window is not compared on acquisition features: a
# handful of images from one detector says little, and K-S on them is noise.
MIN_ACQUISITION_ROWS = 20


@dataclass(frozen=True)
class DriftRule:
    feature_p_value: float = 0.01  # a feature drifts below this K-S p-value
    input_drift_share: float = 0.5  # input drift: at least this share of features drift
    severe_p_value: float = 1e-6  # ... or one feature is this far off (a new detector size)
    prediction_p_value: float = 0.01  # prediction drift: probability K-S p-value below this
    positive_rate_change: float = 0.2  # ... or the positive rate moves this much (absolute,
    # and significantly at prediction_p_value)
    min_labeled: int = 30  # performance is judged only with this many labels (both classes)
    max_auc_drop: float = 0.10  # performance drift: AUC this far below the test AUC
    max_sensitivity_drop: float = 0.10
    max_specificity_drop: float = 0.10
    # Refusal drift: the input gate refuses more than this share of a window's images, and
    # significantly more than it refused of the validation split.
    max_refusal_rate: float = 0.05
    expected_refusal_rate: float = 0.01

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


Interval = tuple[float | None, float | None]
NO_INTERVAL: Interval = (None, None)
UNNAMED_SITE = "(no site)"


@dataclass(frozen=True)
class PerformanceWindow:
    n_labeled: int
    auc: float | None
    sensitivity: float | None
    specificity: float | None
    expected_auc: float | None
    expected_sensitivity: float | None
    expected_specificity: float | None
    failed: tuple[str, ...] = ()  # which of "auc", "sensitivity", "specificity" drifted
    # 95% intervals of the window's own figures, resampling studies where the log has them.
    auc_ci: Interval = NO_INTERVAL
    sensitivity_ci: Interval = NO_INTERVAL
    specificity_ci: Interval = NO_INTERVAL
    interval_unit: str = "image"
    n_groups: int | None = None


@dataclass(frozen=True)
class SiteWindow:
    """One site's share of a window: its own performance and refusal rate."""

    site: str
    n_records: int
    positive_rate: float
    n_refused: int
    refusal_drift: bool
    performance: PerformanceWindow
    estimated_prevalence: float | None = None  # EM, from the site's probabilities alone
    # Chest radiographs refused as outside the version's intended use, counted apart from the
    # input gate's refusals: a site sending adults to a children's model is its own finding.
    n_outside_intended_use: int = 0
    intended_use_drift: bool = False
    # Sensitivity, specificity and prevalence without the window's labels, and which estimate
    # to believe (calibration.label_free).
    label_free: TrustedEstimate | None = None

    @property
    def refusal_rate(self) -> float:
        total = self.n_refused + self.n_records
        return self.n_refused / total if total else 0.0

    @property
    def outside_intended_use_rate(self) -> float:
        total = self.n_outside_intended_use + self.n_records
        return self.n_outside_intended_use / total if total else 0.0

    @property
    def failed(self) -> tuple[str, ...]:
        return (
            self.performance.failed
            + (("refusals",) if self.refusal_drift else ())
            + (("intended use",) if self.intended_use_drift else ())
        )


@dataclass(frozen=True)
class AcquisitionGroup:
    """One kind of traffic in a window (DICOM or image files, per site where named), compared
    on how its images were acquired with the reference rows of the same kind."""

    source: str  # "dicom" or "image" (acquisition_source)
    site: str | None
    n_records: int
    n_reference: int  # reference rows of the same kind
    p_values: dict[str, float] = field(default_factory=dict)
    not_compared: str | None = None  # why, when it was not

    @property
    def label(self) -> str:
        return self.source + (f" @ {self.site}" if self.site is not None else "")


# An explained record is "mostly outside" when under half its relevance lies on the lungs.
MOSTLY_OUTSIDE = 0.5


@dataclass(frozen=True)
class LungRelevanceWindow:
    """Where the window's explanations looked, where a lung fields version measured it: a
    signal to watch (a classifier that starts looking off the lungs), not yet one that fires."""

    n_explained: int
    median: float
    mostly_outside: float  # the share of explained records with most relevance off the lungs


def lung_relevance_of(rows: pd.DataFrame) -> LungRelevanceWindow | None:
    if "relevance_in_lungs" not in rows:
        return None
    shares = pd.to_numeric(rows["relevance_in_lungs"], errors="coerce").dropna().to_numpy()
    if len(shares) == 0:
        return None
    return LungRelevanceWindow(
        n_explained=len(shares),
        median=float(np.median(shares)),
        mostly_outside=float((shares < MOSTLY_OUTSIDE).mean()),
    )


@dataclass(frozen=True)
class DriftResult:
    window: str
    model_version: str | None
    n_records: int
    n_compared: int
    n_reference: int
    feature_p_values: dict[str, float]
    drifted_features: list[str]
    drift_share: float
    input_drift: bool
    probability_p_value: float
    positive_rate: float
    reference_positive_rate: float
    prediction_drift: bool
    performance: PerformanceWindow
    performance_drift: bool
    reasons: list[str]
    rule: DriftRule
    n_refused: int = 0  # images the input gate refused while the window's records came in
    refusal_drift: bool = False
    n_outside_intended_use: int = 0  # chest radiographs refused as outside the intended use
    intended_use_drift: bool = False
    by_site: dict[str, SiteWindow] = field(default_factory=dict)  # where the log names sites
    acquisition: list[AcquisitionGroup] = field(default_factory=list)
    # Pneumonia prevalence of the window's traffic estimated without labels (EM, Saerens et
    # al. 2002), against the validation prevalence the calibration was fitted under.
    estimated_prevalence: float | None = None
    reference_prevalence: float | None = None
    label_free: TrustedEstimate | None = None  # the whole window's, as per site
    lung_relevance: LungRelevanceWindow | None = None  # None: no explanation measured it
    snapshot: Any = field(default=None, repr=False, compare=False)  # Evidently's, for HTML

    @property
    def refusal_rate(self) -> float:
        total = self.n_refused + self.n_records
        return self.n_refused / total if total else 0.0

    @property
    def model_drift(self) -> bool:
        """What a fine-tune can answer; a refusal surge is a routing matter, not the model's."""
        return self.input_drift or self.prediction_drift or self.performance_drift

    @property
    def outside_intended_use_rate(self) -> float:
        total = self.n_outside_intended_use + self.n_records
        return self.n_outside_intended_use / total if total else 0.0

    @property
    def fired(self) -> bool:
        return self.model_drift or self.refusal_drift or self.intended_use_drift

    def summary(self) -> str:
        verdict = "DRIFT" if self.fired else "no drift"
        detail = "; ".join(self.reasons) if self.reasons else "every signal within its threshold"
        return f"{verdict} in window {self.window} ({self.n_records} records): {detail}"

    @property
    def failed_sites(self) -> dict[str, tuple[str, ...]]:
        return {name: site.failed for name, site in self.by_site.items() if site.failed}

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("snapshot")
        values["label_free"] = None if self.label_free is None else self.label_free.to_dict()
        for name, site in self.by_site.items():
            values["by_site"][name]["label_free"] = (
                None if site.label_free is None else site.label_free.to_dict()
            )
        values["fired"] = self.fired
        values["refusal_rate"] = self.refusal_rate
        values["outside_intended_use_rate"] = self.outside_intended_use_rate
        values["failed_sites"] = {name: list(failed) for name, failed in self.failed_sites.items()}
        for name, site in self.by_site.items():
            values["by_site"][name]["refusal_rate"] = site.refusal_rate
            values["by_site"][name]["outside_intended_use_rate"] = site.outside_intended_use_rate
        return values


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """Both sides at the precision the reference file keeps (REFERENCE_FLOAT_FORMAT).

    A confident model's probabilities crowd against 1: stored at six significant digits, every
    one above 0.9999995 reads back as exactly 1, while the log keeps 0.99999996. Compared as
    they are, that difference in rounding alone is a K-S "drift" (p = 0.002 on an
    in-distribution window of the demo's model); rounded alike, it is not (p = 0.25)."""
    values = frame.astype(float).reset_index(drop=True)
    return values.map(lambda value: float(REFERENCE_FLOAT_FORMAT % value))


def _ks_and_chi_square(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    numerical: list[str],
    categorical: Sequence[str] = (),
    *,
    thresholds: dict[str, float] | None = None,
) -> tuple[dict[str, float], Any]:
    """Evidently's p-value per column (K-S for numbers, chi-square for categories), and the
    snapshot for the HTML report (``thresholds``: the rule's p-value per column, so the report
    marks drift where the rule does)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    categorical = list(categorical)
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)

    def prepared(frame: pd.DataFrame) -> pd.DataFrame:
        values = _comparable(frame[numerical])
        for column in categorical:
            values[column] = frame[column].astype(str).to_numpy()
        return values

    thresholds = thresholds or {}
    metrics = [ValueDrift(column=c, method="ks", threshold=thresholds.get(c)) for c in numerical]
    metrics += [
        ValueDrift(column=c, method="chisquare", threshold=thresholds.get(c)) for c in categorical
    ]
    # A category the reference never had (MONOCHROME1 from a new detector) has an expected
    # count of zero: chi-square is infinite and p is 0, which is the right verdict; numpy's
    # division warning about it is not news.
    with np.errstate(divide="ignore"):
        snapshot = Report(metrics, include_tests=False).run(
            current_data=Dataset.from_pandas(prepared(current), data_definition=definition),
            reference_data=Dataset.from_pandas(prepared(reference), data_definition=definition),
        )
    p_values = {m["config"]["column"]: float(m["value"]) for m in snapshot.dict()["metrics"]}
    return p_values, snapshot


def _sources(frame: pd.DataFrame) -> pd.Series:
    formats = frame[SOURCE_FORMAT] if SOURCE_FORMAT in frame else pd.Series(None, frame.index)
    return formats.map(acquisition_source)


def _acquisition_groups(
    reference: pd.DataFrame, scored: pd.DataFrame, feature_p_value: float
) -> list[AcquisitionGroup]:
    """Each kind of traffic (and site) compared with the reference rows of its own kind."""
    reference_sources = _sources(reference)
    sources = _sources(scored)
    sites = (
        scored["site"].astype(object).fillna(UNNAMED_SITE)
        if "site" in scored
        else pd.Series(UNNAMED_SITE, scored.index, dtype=object)
    )
    keys = pd.DataFrame({"source": sources, "site": sites})
    groups = []
    for (source, site_key), rows in keys.groupby(["source", "site"], sort=True):
        site = None if site_key == UNNAMED_SITE else str(site_key)
        current = scored.loc[rows.index]
        matching = reference[reference_sources == source]
        group = AcquisitionGroup(str(source), site, len(current), len(matching))
        if matching.empty:
            groups.append(replace(group, not_compared=f"the reference holds no {source} images"))
            continue
        if len(current) < MIN_ACQUISITION_ROWS:
            groups.append(replace(group, not_compared=f"fewer than {MIN_ACQUISITION_ROWS} records"))
            continue
        numerical = [
            f for f in ACQUISITION_FEATURES if _present(matching, f) and _present(current, f)
        ]
        categorical = [
            f for f in ACQUISITION_CATEGORIES if _present(matching, f) and _present(current, f)
        ]
        if not numerical and not categorical:
            groups.append(replace(group, not_compared="no acquisition feature on both sides"))
            continue
        # Rows missing a value (a log row from before the column existed) are left out of that
        # column's comparison only; K-S needs no imputation.
        p_values, _ = _ks_and_chi_square(
            matching.fillna({c: "unknown" for c in categorical}),
            current.fillna({c: "unknown" for c in categorical}),
            numerical,
            categorical,
            thresholds=dict.fromkeys([*numerical, *categorical], feature_p_value),
        )
        groups.append(replace(group, p_values=p_values))
    return groups


def _present(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].notna().any()


def _auc_of(reference: pd.DataFrame) -> float | None:
    truth = (reference["label"] == "PNEUMONIA").to_numpy()
    if not len(reference) or truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, reference[PROBABILITY].to_numpy()))


def _fallen_below(
    successes: int,
    trials: int,
    expected: float | None,
    allowed_drop: float,
    grouped_upper: float | None = None,
) -> float | None:
    """The rate's 95% upper bound when even that is more than ``allowed_drop`` below
    ``expected``; None when the rate may still be as good (or nothing is expected).

    The bound is the larger of Wilson's (images independent) and ``grouped_upper`` (the
    study-resampled bootstrap's): images of one study are not independent, and a bootstrap of
    few studies alone is too narrow."""
    if expected is None:
        return None
    upper = float(binomtest(successes, trials).proportion_ci(0.95, "wilson").high)
    if grouped_upper is not None:
        upper = max(upper, grouped_upper)
    return upper if upper < expected - allowed_drop else None


def _window_intervals(labeled: pd.DataFrame, truth: np.ndarray) -> tuple[dict, str, int]:
    """95% intervals of the window's AUC, sensitivity and specificity, resampling studies
    (``study_uid_hash``; a row without one is its own group)."""
    studies = (
        labeled["study_uid_hash"]
        if "study_uid_hash" in labeled
        else pd.Series(pd.NA, labeled.index)
    )
    grouped = bool(studies.notna().any())
    alone = pd.Series([f"row:{i}" for i in range(len(labeled))], index=labeled.index)
    groups = studies.astype("string").fillna(alone)
    served = (labeled["label"] == "PNEUMONIA").to_numpy(dtype=float)
    intervals = cluster_bootstrap_intervals(
        truth.astype(int),
        labeled["probability"].to_numpy(dtype=float),
        served,  # the decisions as they were served, whatever threshold made them
        0.5,
        groups.to_numpy(dtype=str),
        n_bootstrap=WINDOW_BOOTSTRAP,
        seed=0,
    )
    return intervals, "study" if grouped else "image", int(groups.nunique())


def _performance(
    labeled: pd.DataFrame,
    expected: dict[str, float],
    rule: DriftRule,
    *,
    reference_auc: float | None = None,
) -> tuple[PerformanceWindow, list[str]]:
    """Judged against the least the version's own evaluations vouch for: the lower end of its
    test AUC's 95% CI or its validation AUC (in the reference), whichever is lower, since a
    small split can be lucky; and the window's sensitivity and specificity at the version's
    threshold only when even their Wilson upper bounds are below the test figures by more than
    the allowed drop."""
    truth = (labeled["feedback_label"] == "PNEUMONIA").to_numpy()
    predicted = (labeled["label"] == "PNEUMONIA").to_numpy()
    vouched = [
        value
        for value in (expected.get("test_auc_ci_low", expected.get("test_auc")), reference_auc)
        if value is not None
    ]
    expected_auc = min(vouched) if vouched else None
    window = PerformanceWindow(
        n_labeled=len(labeled),
        auc=None,
        sensitivity=None,
        specificity=None,
        expected_auc=expected_auc,
        expected_sensitivity=expected.get("test_sensitivity"),
        expected_specificity=expected.get("test_specificity"),
    )
    reasons: list[str] = []
    if len(labeled) < rule.min_labeled or truth.all() or not truth.any():
        return window, reasons
    auc = float(roc_auc_score(truth, labeled["probability"].to_numpy()))
    detected = int(predicted[truth].sum())
    sensitivity = detected / int(truth.sum())
    specificity = float((~predicted[~truth]).mean())
    intervals, unit, n_groups = _window_intervals(labeled, truth)
    window = replace(
        window,
        auc=auc,
        sensitivity=sensitivity,
        specificity=specificity,
        auc_ci=intervals["auc"],
        sensitivity_ci=intervals["sensitivity"],
        specificity_ci=intervals["specificity"],
        interval_unit=unit,
        n_groups=n_groups,
    )
    failed: list[str] = []
    if expected_auc is not None and auc < expected_auc - rule.max_auc_drop:
        failed.append("auc")
        reasons.append(
            f"AUC on {len(labeled)} labeled {auc:.3f} < {expected_auc:.3f} (the lower of test "
            f"AUC's 95% bound and validation AUC) - {rule.max_auc_drop:g}"
        )
    upper = _fallen_below(
        detected,
        int(truth.sum()),
        window.expected_sensitivity,
        rule.max_sensitivity_drop,
        window.sensitivity_ci[1] if unit == "study" else None,
    )
    if upper is not None:
        failed.append("sensitivity")
        reasons.append(
            f"sensitivity on {int(truth.sum())} labeled positives {sensitivity:.3f} (95% upper "
            f"bound {upper:.3f}) < test {window.expected_sensitivity:.3f} - "
            f"{rule.max_sensitivity_drop:g}"
        )
    # The failure a site change most often brings: more false positives at the same threshold.
    negatives = int((~truth).sum())
    cleared = int((~predicted[~truth]).sum())
    upper = _fallen_below(
        cleared,
        negatives,
        window.expected_specificity,
        rule.max_specificity_drop,
        window.specificity_ci[1] if unit == "study" else None,
    )
    if upper is not None:
        failed.append("specificity")
        reasons.append(
            f"specificity at the version's threshold on {negatives} labeled negatives "
            f"{specificity:.3f} (95% upper bound {upper:.3f}) < test "
            f"{window.expected_specificity:.3f} - {rule.max_specificity_drop:g}"
        )
    return replace(window, failed=tuple(failed)), reasons


def evaluate_window(
    reference: pd.DataFrame,
    records: pd.DataFrame,
    *,
    window: str,
    rule: DriftRule | None = None,
    model_version: str | None = None,
    expected_metrics: dict[str, float] | None = None,
    n_refused: int = 0,
    refused_by_site: dict[str, int] | None = None,
    n_outside_intended_use: int = 0,
    outside_by_site: dict[str, int] | None = None,
    operating_point: OperatingPoint | None = None,
    site_labels: dict[str, SiteLabels] | None = None,
) -> DriftResult:
    """``records`` are inference-log rows (:meth:`InferenceLog.records`). Only the rows that
    ``model_version`` scored are compared, since ``reference`` holds that version's
    probabilities; a window that spans a promotion is judged on its rows of that version.
    ``refused_by_site``: the input gate's refusals in the window per site, where the log names
    sites; ``n_outside_intended_use`` and ``outside_by_site`` the intended-use refusals,
    judged apart. ``operating_point``: the version's, for label-free estimates (none without
    it); ``site_labels``: each site's labeled rows scored by the version, any time, which let
    those estimates stop assuming the calibration holds."""
    rule = rule or DriftRule()
    scored = (
        records if model_version is None else records[records["model_version"] == model_version]
    )
    if scored.empty:
        raise DriftError(f"window {window} has no records scored by version {model_version}")
    # A feature missing on either side (sharpness in rows logged before it existed) is skipped.
    features = [f for f in CONTENT_FEATURES if _present(reference, f) and _present(scored, f)]
    p_values, snapshot = _ks_and_chi_square(
        reference,
        scored,
        [*features, PROBABILITY],
        thresholds={
            **dict.fromkeys(features, rule.feature_p_value),
            PROBABILITY: rule.prediction_p_value,
        },
    )
    feature_p = {f: p_values[f] for f in features}
    acquisition = _acquisition_groups(reference, scored, rule.feature_p_value)
    for group in acquisition:
        feature_p.update({f"{f} [{group.label}]": p for f, p in group.p_values.items()})
    features = list(feature_p)
    drifted = [f for f, p in feature_p.items() if p < rule.feature_p_value]
    share = len(drifted) / len(features) if features else 0.0
    reasons: list[str] = []
    severe = [f for f, p in feature_p.items() if p < rule.severe_p_value]
    input_drift = bool(features) and (share >= rule.input_drift_share or bool(severe))
    if input_drift:
        reasons.append(f"{len(drifted)} of {len(features)} input features drifted ({share:.0%})")
    if severe:
        reasons.append(f"severe drift (K-S p < {rule.severe_p_value:g}) in {', '.join(severe)}")

    probability_p = p_values[PROBABILITY]
    positive_rate = float((scored["label"] == "PNEUMONIA").mean())
    scored_reference = reference[reference[PROBABILITY].notna()]
    reference_rate = float((scored_reference[PREDICTED] == "PNEUMONIA").mean())
    prediction_drift = False
    if probability_p < rule.prediction_p_value:
        prediction_drift = True
        reasons.append(f"probability distribution drifted (K-S p={probability_p:.2g})")
    positives = int((scored["label"] == "PNEUMONIA").sum())
    # A large change in a small window is noise: the binomial test keeps it from firing.
    rate_p = float(
        binomtest(positives, len(scored), min(max(reference_rate, 1e-6), 1 - 1e-6)).pvalue
    )
    if (
        abs(positive_rate - reference_rate) >= rule.positive_rate_change
        and rate_p < rule.prediction_p_value
    ):
        prediction_drift = True
        reasons.append(
            f"positive rate {positive_rate:.2f} vs reference {reference_rate:.2f} "
            f"(binomial p={rate_p:.2g})"
        )

    reference_auc = _auc_of(scored_reference)
    reference_prevalence = _prevalence_of(scored_reference)
    labeled = _labeled(scored)
    performance, performance_reasons = _performance(
        labeled, expected_metrics or {}, rule, reference_auc=reference_auc
    )
    reasons += performance_reasons
    refusal_drift, refusal_reasons = _refusals(n_refused, len(records), rule)
    reasons += refusal_reasons
    intended_use_drift, intended_use_reasons = _refusals(
        n_outside_intended_use, len(records), rule, kind=INTENDED_USE_REFUSALS
    )
    reasons += intended_use_reasons
    estimates = _LabelFree(
        operating_point,
        site_labels or {},
        calibration_suspect=input_drift or prediction_drift,
        reference_prevalence=reference_prevalence,
        min_labeled=rule.min_labeled,
    )
    by_site, site_reasons = _per_site(
        records,
        scored,
        (refused_by_site or {}, outside_by_site or {}),
        expected_metrics or {},
        rule,
        reference_auc,
        reference_prevalence,
        estimates,
    )
    reasons += site_reasons
    site_performance = any(site.performance.failed for site in by_site.values())
    refusal_drift = refusal_drift or any(site.refusal_drift for site in by_site.values())
    intended_use_drift = intended_use_drift or any(
        site.intended_use_drift for site in by_site.values()
    )
    return DriftResult(
        window=window,
        model_version=model_version,
        n_records=len(records),
        n_compared=len(scored),
        n_reference=len(reference),
        feature_p_values=feature_p,
        drifted_features=drifted,
        drift_share=share,
        input_drift=input_drift,
        probability_p_value=probability_p,
        positive_rate=positive_rate,
        reference_positive_rate=reference_rate,
        prediction_drift=prediction_drift,
        performance=performance,
        performance_drift=bool(performance_reasons) or site_performance,
        reasons=reasons,
        rule=rule,
        n_refused=n_refused,
        refusal_drift=refusal_drift,
        n_outside_intended_use=n_outside_intended_use,
        intended_use_drift=intended_use_drift,
        by_site=by_site,
        acquisition=acquisition,
        estimated_prevalence=_estimated_prevalence(scored, reference_prevalence),
        reference_prevalence=reference_prevalence,
        label_free=estimates.of(scored, None),
        lung_relevance=lung_relevance_of(records),
        snapshot=snapshot,
    )


def _prevalence_of(reference: pd.DataFrame) -> float | None:
    if "label" not in reference or not len(reference):
        return None
    prevalence = float((reference["label"] == "PNEUMONIA").mean())
    return prevalence if 0 < prevalence < 1 else None


def _estimated_prevalence(rows: pd.DataFrame, reference_prevalence: float | None) -> float | None:
    if reference_prevalence is None or rows.empty:
        return None
    estimate = estimate_prevalence(rows["probability"].to_numpy(dtype=float), reference_prevalence)
    return estimate.prevalence


@dataclass(frozen=True)
class _LabelFree:
    """Label-free estimates for a window's rows (of one site, or all)."""

    operating_point: OperatingPoint | None
    site_labels: dict[str, SiteLabels]
    calibration_suspect: bool
    reference_prevalence: float | None
    min_labeled: int

    def of(self, rows: pd.DataFrame, site: str | None) -> TrustedEstimate | None:
        if self.operating_point is None or rows.empty:
            return None
        probabilities = rows["probability"].to_numpy(dtype=float)
        em = _estimated_prevalence(rows, self.reference_prevalence)
        return trusted_estimate(
            probabilities,
            self.operating_point.threshold,
            logits=logits_from_probabilities(probabilities, self.operating_point),
            em_prevalence=em,
            calibration_suspect=self.calibration_suspect,
            training_prevalence=self.reference_prevalence,
            site_labels=self.site_labels.get(site) if site is not None else None,
            min_labeled=self.min_labeled,
        )


def _labeled(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["feedback_label"].notna()] if "feedback_label" in rows else rows[:0]


def _per_site(
    records: pd.DataFrame,
    scored: pd.DataFrame,
    refused: tuple[dict[str, int], dict[str, int]],
    expected: dict[str, float],
    rule: DriftRule,
    reference_auc: float | None,
    reference_prevalence: float | None,
    estimates: _LabelFree,
) -> tuple[dict[str, SiteWindow], list[str]]:
    """Each named site judged on its own rows, as the whole window is: a site whose
    specificity collapsed can hide in a window most of whose traffic comes from elsewhere."""
    sites = records["site"].fillna(UNNAMED_SITE) if "site" in records else None
    if sites is None or (sites == UNNAMED_SITE).all():
        return {}, []
    scored_sites = sites.loc[scored.index]
    refused_by_site, outside_by_site = refused
    by_site: dict[str, SiteWindow] = {}
    reasons: list[str] = []
    for name in sorted(set(sites) | set(refused_by_site) | set(outside_by_site)):
        rows = scored[scored_sites == name]
        performance, performance_reasons = _performance(
            _labeled(rows), expected, rule, reference_auc=reference_auc
        )
        n_records = int((sites == name).sum())
        n_refused = int(refused_by_site.get(name, 0))
        n_outside = int(outside_by_site.get(name, 0))
        # A site that sent two misrouted images is not a surge: as for performance, a site's
        # refusals are judged once it sent as many images as a labeled judgment needs.
        refusal_drift, refusal_reasons = (
            _refusals(n_refused, n_records, rule)
            if n_records + n_refused >= rule.min_labeled
            else (False, [])
        )
        outside_drift, outside_reasons = (
            _refusals(n_outside, n_records, rule, kind=INTENDED_USE_REFUSALS)
            if n_records + n_outside >= rule.min_labeled
            else (False, [])
        )
        by_site[name] = SiteWindow(
            site=name,
            n_records=n_records,
            positive_rate=float((rows["label"] == "PNEUMONIA").mean()) if len(rows) else 0.0,
            n_refused=n_refused,
            refusal_drift=refusal_drift,
            performance=performance,
            estimated_prevalence=_estimated_prevalence(rows, reference_prevalence),
            n_outside_intended_use=n_outside,
            intended_use_drift=outside_drift,
            label_free=estimates.of(rows, name),
        )
        reasons += [
            f"site {name}: {reason}"
            for reason in performance_reasons + refusal_reasons + outside_reasons
        ]
    return by_site, reasons


GATE_REFUSALS = (
    "the input gate refused {n} of {total} images",
    "images that are not frontal chest radiographs are being routed here",
)
INTENDED_USE_REFUSALS = (
    "{n} of {total} chest radiographs were outside the version's intended use",
    "patients the model was not made for (by age or by the look of the image) are being "
    "routed here",
)


def _refusals(
    n_refused: int, n_scored: int, rule: DriftRule, *, kind: tuple[str, str] = GATE_REFUSALS
) -> tuple[bool, list[str]]:
    total = n_refused + n_scored
    if not total:
        return False, []
    rate = n_refused / total
    # As with the positive rate: a small window's few refusals are noise unless significant.
    p_value = float(
        binomtest(n_refused, total, rule.expected_refusal_rate, alternative="greater").pvalue
    )
    if rate > rule.max_refusal_rate and p_value < rule.prediction_p_value:
        what, meaning = kind
        return True, [
            f"{what.format(n=n_refused, total=total)} ({rate:.0%}; at most "
            f"{rule.max_refusal_rate:.0%}, binomial p={p_value:.2g}): {meaning}"
        ]
    return False, []


def _figure(value: float | None, interval: Interval = NO_INTERVAL) -> str:
    if value is None:
        return "n/a"
    low, high = interval
    return f"{value:.3f}" + (f" ({low:.3f}-{high:.3f})" if low is not None else "")


def acquisition_markdown(result: DriftResult) -> str:
    """Each kind of traffic: how many records, against how many reference rows, and each
    acquisition feature's p-value, or why it was not compared."""
    if not result.acquisition:
        return "No acquisition features in this window."
    lines = ["| traffic | records | reference rows | compared |", "| --- | ---: | ---: | --- |"]
    for group in result.acquisition:
        compared = group.not_compared or ", ".join(
            f"{name} p={p:.2g}" for name, p in group.p_values.items()
        )
        lines.append(f"| {group.label} | {group.n_records} | {group.n_reference} | {compared} |")
    return "\n".join(lines)


def sites_markdown(result: DriftResult) -> str:
    """Per site: traffic, refusals, and performance with 95% intervals where labeled."""
    if not result.by_site:
        return "The log names no sites in this window."
    lines = [
        "| site | records | refused | outside intended use | positive rate | prevalence (EM) "
        "| labeled | AUC | sensitivity | specificity | label-free sens / spec / prevalence "
        "(trusted) | failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, site in result.by_site.items():
        performance = site.performance
        lines.append(
            f"| {name} | {site.n_records} | {site.n_refused} ({site.refusal_rate:.1%}) | "
            f"{site.n_outside_intended_use} ({site.outside_intended_use_rate:.1%}) | "
            f"{site.positive_rate:.2f} | {_figure(site.estimated_prevalence)} | "
            f"{performance.n_labeled} | "
            f"{_figure(performance.auc, performance.auc_ci)} | "
            f"{_figure(performance.sensitivity, performance.sensitivity_ci)} | "
            f"{_figure(performance.specificity, performance.specificity_ci)} | "
            f"{_label_free_cell(site.label_free)} | "
            f"{', '.join(site.failed) or '-'} |"
        )
    return "\n".join(lines)


def _label_free_cell(estimate: TrustedEstimate | None) -> str:
    if estimate is None:
        return "-"
    if estimate.refitted is not None and estimate.adjusted is not None:
        chosen, prevalence = estimate.refitted, estimate.adjusted.prevalence
    else:
        chosen, prevalence = estimate.cbpe, estimate.cbpe.prevalence
    return (
        f"{_figure(chosen.sensitivity)} / {_figure(chosen.specificity)} / "
        f"{_figure(prevalence)} ({estimate.trusted})"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def save_drift_report(result: DriftResult, folder: Path) -> dict[str, Path]:
    """``drift.json`` (the decision and every number) and Evidently's ``drift_report.html``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "drift.json"
    json_path.write_text(json.dumps(_jsonable(result.to_dict()), indent=2) + "\n")
    files = {"json": json_path}
    if result.snapshot is not None:
        html_path = folder / "drift_report.html"
        result.snapshot.save_html(str(html_path))
        files["html"] = html_path
    return files
